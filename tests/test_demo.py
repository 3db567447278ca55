"""The demo runs end to end (tiny settings) and writes its outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "demo.py"),
        "--out",
        str(tmp_path),
        "--num-samples",
        "30",
        "--warmup",
        "30",
        "--thin",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "r_hat" in proc.stdout and "elpd_loo" in proc.stdout
    png = tmp_path / "demo_ppc.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert (tmp_path / "demo_run.nc").exists()

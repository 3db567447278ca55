"""The early-convergence example runs end to end in quick mode and writes its outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"identity", "rmsprop", "bnp", "bnp+rmsprop"}


def test_early_convergence_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "early_convergence.py"), "--quick"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["budget_updates"] == 300
    assert set(results["problems"]) == {"linreg", "bnn"}
    for entry in results["problems"].values():
        assert math.isfinite(entry["target"])
        assert set(entry["methods"]) == METHODS
        for m in entry["methods"].values():
            for key in ("best_eps", "median_evals", "min_evals", "max_evals"):
                assert math.isfinite(m[key]), key
            assert 1 <= m["min_evals"] <= m["median_evals"] <= m["max_evals"] <= 301
            assert m["final_mean"] is not None and math.isfinite(m["final_mean"])
            assert math.isfinite(m["final_sd"])
    png = tmp_path / "early_convergence.png"
    assert png.exists() and png.stat().st_size > 10_000

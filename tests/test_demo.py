"""The demo runs end to end (tiny settings) and writes its outputs."""

from __future__ import annotations

from _run import run_example


def test_demo_runs(tmp_path):
    settings = ["--num-samples", "30", "--warmup", "30", "--thin", "1"]
    proc = run_example("demo", "--out", tmp_path, *settings, timeout=300)
    assert "r_hat" in proc.stdout and "elpd_loo" in proc.stdout
    png = tmp_path / "demo_ppc.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert (tmp_path / "demo_run.nc").exists()

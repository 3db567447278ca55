"""The early-convergence example runs end to end in quick mode and writes its outputs."""

from __future__ import annotations

import json
import math

import pytest
from _run import METHODS, run_example


def test_early_convergence_quick(tmp_path):
    run_example("early_convergence", "--quick", "--out", tmp_path, timeout=120)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["budget_updates"] == 300
    assert set(results["problems"]) == {"linreg", "bnn"}
    for name, entry in results["problems"].items():
        assert math.isfinite(entry["target"])
        extra = {"bnp-others"} if name == "bnn" else set()
        assert set(entry["methods"]) == METHODS | {"sghmc", "bnp-sghmc"} | extra
        for m in entry["methods"].values():
            for key in ("best_eps", "median_evals", "min_evals", "max_evals"):
                assert math.isfinite(m[key]), key
            assert 1 <= m["min_evals"] <= m["median_evals"] <= m["max_evals"] <= 301
            assert m["final_mean"] is not None and math.isfinite(m["final_mean"])
            assert math.isfinite(m["final_sd"])
        for m in ("sghmc", "bnp-sghmc"):  # SGHMC at the SGLD-equivalent step size
            sg = entry["methods"][m]["sghmc"]
            assert sg["step_size_h"] * sg["friction"] == pytest.approx(0.1)
    png = tmp_path / "early_convergence.png"
    assert png.exists() and png.stat().st_size > 10_000

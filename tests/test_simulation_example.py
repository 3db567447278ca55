"""The simulation-study example runs end to end in quick mode and writes its outputs."""

from __future__ import annotations

import json
import math

import pytest
from _run import METHODS, run_example

CASES = {"moderate/linreg", "moderate/bnn", "severe/linreg", "severe/bnn"}
SGHMC = {"sghmc", "bnp-sghmc"}  # pyro_bnp.SGHMC rows (issue 15)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def test_simulation_quick(tmp_path):
    run_example("simulation", "--quick", "--out", tmp_path, timeout=180)
    results = json.loads((tmp_path / "results.json").read_text())
    settings = results["settings"]
    assert settings["quick"] and settings["budget_updates"] == 120
    assert len(settings["seeds"]) == 2
    assert set(results["results"]) == CASES

    for case, entry in results["results"].items():
        assert set(entry["methods"]) == METHODS | SGHMC, case
        metrics = ["mahalanobis", "cov_rel_frob", "var_rel_err", "kl"]
        if case.endswith("bnn"):
            metrics = ["nll"]
        for m, r in entry["methods"].items():
            assert r["eps"] > 0 and _finite(r["eps"])
            # the chosen step size is one of the pilot grid's
            assert f"{r['eps']:g}" in r["pilot"], (case, m)
            for k in metrics:
                final = r["final"][k]
                assert _finite(final["mean"]) and _finite(final["sd"]), (case, m, k)
                assert len(r["curves"][k]["mean"]) == len(settings["checkpoints"])
        # condition numbers are recorded in the SGLD and BNP-SGLD runs only
        for m in ("identity", "bnp"):
            cond = entry["methods"][m]["condition"]
            assert set(cond) == {"eps1=1e-2", "eps1=0"}
            for blocks in cond.values():
                for block in blocks.values():
                    assert _finite(block["last"]["kappa"]) and _finite(block["last"]["kappa_bnp"])
        assert "condition" not in entry["methods"]["rmsprop"]
        for m in SGHMC:  # the SGHMC update behind the SGLD-equivalent step size
            r = entry["methods"][m]
            h, alpha = r["sghmc"]["step_size_h"], r["sghmc"]["friction"]
            assert _finite(h) and _finite(alpha) and h * alpha == pytest.approx(0.1)
            assert 2 * h**2 / (2 - h * alpha) == pytest.approx(r["eps"])

    # severe linear model: BNP lowers the condition number of the neuron's Hessian / Fisher
    # block, and without the floor (eps1 = 0) by far more (about kappa(D)^2)
    severe = results["results"]["severe/linreg"]
    assert "bnp_eps1_0" in severe["extra"]
    for setting in ("moderate", "severe"):
        assert set(results["results"][f"{setting}/bnn"]["extra"]) == {"bnp-others"}
    for m in ("identity", "bnp"):
        cond = severe["methods"][m]["condition"]
        for kind in ("hessian", "fisher"):
            floored = cond["eps1=1e-2"][f"linear/{kind}"]
            unfloored = cond["eps1=0"][f"linear/{kind}"]
            for k, kb in zip(floored["kappa"], floored["kappa_bnp"], strict=True):
                assert kb < k / 10, (m, kind, k, kb)
            for k, kb in zip(unfloored["kappa"], unfloored["kappa_bnp"], strict=True):
                assert kb < k / 1e5, (m, kind, k, kb)
        hess = cond["eps1=0"]["linear/hessian"]["last"]
        assert hess["kappa_D_sq"] > 1e7  # scales 1e-2..1e2
        assert 0.1 < hess["reduction"] / hess["kappa_D_sq"] < 10

    for name in ("simulation_linreg.png", "simulation_bnn.png", "simulation_condition.png"):
        png = tmp_path / name
        assert png.exists() and 10_000 < png.stat().st_size < 400_000, name

"""Smoke test of the benchmark suite: ``run_all.py --quick`` runs and writes sane JSON files.

The quick run uses tiny data and budgets (its numbers mean nothing); it takes well under a
minute on an idle 2-core machine. The timeout only guards against a hang (generous: busy machines).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("step", "scaling", "nuts", "memory")


def _numbers(x: Any) -> list[float]:
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    raise AssertionError(f"unexpected JSON value {x!r}")


def _load(path: Path) -> Any:
    def reject(name: str) -> None:
        raise AssertionError(f"{path.name}: non-finite number {name} in JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def test_run_all_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only (see _run.HANG_FACTOR)
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "status" in proc.stdout  # the table was printed

    results = {}
    for name in (*BENCHMARKS, "summary"):
        path = tmp_path / f"{name}.json"
        assert path.exists(), f"missing {path.name}"
        results[name] = data = _load(path)
        numbers = _numbers(data)
        assert numbers and all(math.isfinite(n) for n in numbers)
        rows = data["rows"] if name == "summary" else data["summary"]
        assert rows and all(set(r) == {"bench", "case", "value", "target", "status"} for r in rows)

    for case in results["step"]["cases"]:
        timings = case["timings"]
        assert {
            "hand",
            "identity",
            "rmsprop",
            "bnp",
            "bnp+rmsprop",
            "bnp-frozen",
            "pyro_grad",
            "sghmc identity",
            "sghmc bnp",
        } <= set(timings)
        assert all(math.isfinite(v) and v > 0 for v in case["sghmc_over_sgld"].values())
        assert all(t["median_us"] > 0 for t in timings.values())
        assert case["bnp_overhead"] > 0 and case["bnp_frozen_overhead"] > 0
        assert case["divergences"] == {k: 0 for k in case["divergences"]}
    scaling = results["scaling"]
    assert set(scaling["step_ratio_largest_to_smallest"]) == {"hand", "identity", "bnp"}
    nuts = results["nuts"]
    assert [m["method"] for m in nuts["methods"]] == ["nuts", "sgld", "psgld", "bnp"]
    assert nuts["target_nll"] is not None
    more = {m["method"]: m for m in nuts["more_methods"]}
    assert {"sghmc", "bnp-sghmc"} <= set(more)
    assert all(
        more[m]["sampler"] == "sghmc" and more[m]["draws"] > 0 for m in ("sghmc", "bnp-sghmc")
    )
    memory = results["memory"]
    assert [c["config"] for c in memory["configs"]][0] == "baseline"
    assert all(c["peak_rss_mb"] > 0 for c in memory["configs"])

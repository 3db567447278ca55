"""Old against new: ``bench_step``'s per-step cost of two versions of pyro_bnp, side by side.

For a refactor that must not lose speed. The baseline package is extracted from a git revision
(``git archive REV pyro_bnp``), renamed ``pyro_bnp_baseline`` and imported beside the working
tree's ``pyro_bnp`` in ONE process; every contender (``hand`` and each preconditioner at both
versions) runs interleaved round-robin in the same loop (:func:`common.interleaved`), from the
same initial weights and data. Reported per network and preconditioner: the median step time of
each version, their ratio ``new / baseline`` (ratio of medians, and the median of the per-round
ratios), and each version's ratio to the hand-written step.

Run ``python benchmarks/compare_step.py --baseline REV [--quick]``.
"""

from __future__ import annotations

import copy
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_step import BATCH, PRECONDITIONERS, SIZES, STEP_SIZES, make_case, ours
from common import (
    HandSGLD,
    bench_parser,
    fmt_us,
    interleaved,
    machine_info,
    paired_ratio,
    ratio,
    report,
    set_threads,
    status,
    strip_rounds,
)

import pyro_bnp

TOLERANCE = 1.05  # the redesign's target: every ratio within 5 % of before
ROOT = Path(__file__).resolve().parent.parent


def load_baseline(rev: str, into: Path) -> ModuleType:
    """Import the package of git revision ``rev`` as ``pyro_bnp_baseline``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "pyro_bnp"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    src, dst = into / "pyro_bnp", into / "pyro_bnp_baseline"
    src.rename(dst)
    for path in dst.rglob("*.py"):
        text = re.sub(r"\bpyro_bnp\b", "pyro_bnp_baseline", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("pyro_bnp_baseline")


def bench_case(name: str, base: ModuleType, *, quick: bool, budget_s: float) -> dict[str, Any]:
    case = make_case(name, 1_000 if quick else SIZES[name])
    eps = STEP_SIZES[name]
    hand = HandSGLD(
        copy.deepcopy(case["net"]), case["x"], case["y"], BATCH, eps, case["likelihood"]
    )
    contenders: dict[str, Any] = {"hand": hand.step}
    kernels = []
    for pre in PRECONDITIONERS:
        for tag, pkg in (("baseline", base), ("new", pyro_bnp)):
            contenders[f"{pre}@{tag}"], kernel = ours(case, pre, eps, pkg=pkg)
            kernels.append(kernel)
    timings = interleaved(
        contenders,
        warmup=2 if quick else 30,
        budget_s=budget_s,
        block_s=0.002 if quick else 0.02,
        min_rounds=3 if quick else 5,
    )
    for k in kernels:
        k.cleanup()
    rows = {}
    for pre in PRECONDITIONERS:
        new, old = f"{pre}@new", f"{pre}@baseline"
        rows[pre] = {
            "new_us": timings[new]["median_us"],
            "baseline_us": timings[old]["median_us"],
            "new_over_baseline": ratio(timings, new, old),
            "new_over_baseline_paired": paired_ratio(timings, new, old),
            "new_over_hand": ratio(timings, new, "hand"),
            "baseline_over_hand": ratio(timings, old, "hand"),
        }
    return {"case": name, "step_size": eps, "rows": rows, "timings": strip_rounds(timings)}


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for c in result["cases"]:
        for pre, r in c["rows"].items():
            out.append(
                {
                    "case": f"{c['case']} {pre}",
                    "value": (
                        f"new {fmt_us(r['new_us'])} / baseline {fmt_us(r['baseline_us'])} = "
                        f"{r['new_over_baseline']:.3f}x "
                        f"(paired {r['new_over_baseline_paired']:.3f}x);"
                        f" x hand {r['baseline_over_hand']:.2f} -> {r['new_over_hand']:.2f}"
                    ),
                    "target": f"<= {TOLERANCE:.2f}x",
                    "status": status(r["new_over_baseline_paired"], TOLERANCE),
                }
            )
    return out


def main() -> None:
    parser = bench_parser(__doc__, "compare_step")
    parser.add_argument("--baseline", required=True, help="git revision of the baseline")
    parser.add_argument("--cases", default="mlp-10-50-1,mlp-784-400-400-10,cnn-3x32x32")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds per case")
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_baseline(args.baseline, Path(tmp))
        budget = 0.3 if args.quick else args.budget
        cases = [
            bench_case(n, base, quick=args.quick, budget_s=budget) for n in args.cases.split(",")
        ]
    result = {
        "benchmark": "compare_step",
        "baseline": args.baseline,
        "quick": args.quick,
        "machine": machine_info(),
        "cases": cases,
    }
    result["summary"] = summary_rows(result)
    report(result, args.out)


if __name__ == "__main__":
    main()

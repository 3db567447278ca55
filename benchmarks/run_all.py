"""Run every benchmark, print one table, write one JSON file per benchmark.

Also ``summary.json`` (every row, machine, durations) and ``summary.md`` (the table in Markdown).

``make bench`` runs ``python benchmarks/run_all.py --out benchmarks/results`` (about 12 minutes
on a 2-core machine); ``--quick`` is a seconds-long smoke run of the same code paths (tiny
budgets and data, numbers meaningless). ``--only step,nuts`` runs a subset (the table keeps
the other benchmarks' rows from their JSON files in ``--out``, if any). One torch thread by
default (``--threads 0`` keeps torch's default): on a 2-core machine shared with other jobs,
intra-op threads make small steps slower and erratic.

Benchmarks (see each module's docstring and ``docs/benchmarks.md``):

* ``step`` (:mod:`bench_step`): per-step cost of ``SGLD.sample`` against a hand-written torch
  step, Pyro's ``potential_grad`` and ``posteriors`` (if importable); BNP overhead;
* ``scaling`` (:mod:`bench_scaling`): step time for N = 1e3 .. 1e6 rows, full-data gradients;
* ``nuts`` (:mod:`bench_nuts`): wall-clock time to a target test NLL against Pyro NUTS;
* ``memory`` (:mod:`bench_memory`): peak RSS of long runs, one subprocess per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_memory  # noqa: E402
import bench_nuts  # noqa: E402
import bench_scaling  # noqa: E402
import bench_step  # noqa: E402
from common import CODE_AT_IMPORT, git_state, machine_info, set_threads, write_json  # noqa: E402

BENCHMARKS = {
    "step": bench_step.run,
    "scaling": bench_scaling.run,
    "nuts": bench_nuts.run,
    "memory": bench_memory.run,
}


def markdown_table(rows: list[dict[str, str]]) -> str:
    cols = ("bench", "case", "value", "target", "status")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, str]]) -> None:
    cols = ("bench", "case", "value", "target", "status")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(f"{c:<{widths[c]}}" for c in cols)
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{r[c]:<{widths[c]}}" for c in cols).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for JSON files")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument(
        "--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS)
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    set_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # tensordict, via posteriors
    out = Path(args.out)
    by_bench: dict[str, list[dict[str, str]]] = {}
    for name in BENCHMARKS:  # with --only, keep the other benchmarks' rows of an earlier run
        previous = out / f"{name}.json"
        if args.only and name not in names and previous.exists():
            by_bench[name] = json.loads(previous.read_text())["summary"]
    durations: dict[str, float] = {}
    failed: list[str] = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"[run_all] {name} ...", flush=True)
        try:
            result: dict[str, Any] = BENCHMARKS[name](quick=args.quick, threads=args.threads)
        except Exception as e:  # report, run the others, fail at the end
            traceback.print_exc()
            failed.append(name)
            error = f"{type(e).__name__}: {e}".splitlines()[0][:120]
            by_bench[name] = [
                {"bench": name, "case": "FAILED", "value": error, "target": "", "status": "FAILED"}
            ]
            continue
        finally:
            durations[name] = time.perf_counter() - t0
        result["duration_s"] = durations[name]
        write_json(out / f"{name}.json", result)
        by_bench[name] = result["summary"]
        print(f"[run_all] {name} done in {durations[name]:.0f} s", flush=True)
    rows = [row for name in BENCHMARKS for row in by_bench.get(name, [])]
    info = machine_info()
    if git_state() != CODE_AT_IMPORT:
        print(
            f"WARNING: the code changed during the run ({CODE_AT_IMPORT} -> {git_state()}); "
            "this process measured the code it imported at the start (the memory benchmark's "
            "subprocesses import the code of their start)"
        )
    summary = {
        "command": " ".join(["python", *sys.argv]),
        "quick": args.quick,
        "machine": info,
        "durations_s": durations,
        "total_s": time.perf_counter() - start,
        "failed": failed,
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown_table(rows))
    print()
    print(
        f"{info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({info['torch_threads']} "
        f"thread(s)), pyro {info['pyro']}, posteriors {info['posteriors']}, {info['date']}, "
        f"code {info['git']}"
    )
    print_table(rows)
    print(f"\nwrote JSON files to {out} in {summary['total_s']:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

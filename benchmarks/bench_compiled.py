"""Benchmark: the compiled update (``compile=True``) against the eager one and a hand-written step.

Per network (bench_step's 10-50-1 tanh MLP with a Gaussian likelihood, 784-400-400-10 ReLU MLP
and the small CNN, categorical; batch 128), interleaved round-robin in one loop (see
:mod:`common`), one update per call (``thin=1``):

* ``hand``: bench_step's hand-written eager torch SGLD step (``common.HandSGLD``);
* ``<pre> eager`` and ``<pre> compiled``: ``pyro_bnp.SGLD.sample`` with ``compile=False`` and
  ``compile=True`` for ``pre`` in identity, rmsprop; ``sghmc identity compiled`` likewise;
* ``bnp eager``, ``bnp compiled`` and ``bnp+rmsprop compiled`` (BNP's statistics updated
  at every update, as in bench_step);
* ``identity compiled unroll10`` and ``bnp compiled unroll10``: ``thin=10`` with
  ``compile_options={"unroll": 10, "checks": "device"}`` (the ten updates of a draw in one graph
  call); their times are per update (per call / 10);
* ``identity compiled cudagraphs`` (``--device cuda`` only, ``--contenders`` adds it): the same
  graph with inductor's CUDA graphs (``compile_options={"triton.cudagraphs": True}``).

Compile time is reported separately: tracing (``make_fx``) and inductor's compilation, with
whatever inductor cache the machine has (``TORCHINDUCTOR_CACHE_DIR`` to control it).

On a GPU (``--device cuda``) the data, the network, the hand step's generators and the kernels
live on the device; every timed block ends with ``torch.cuda.synchronize()``. The GPU table of
docs/benchmarks.md is ``--device cuda --cases mlp-784-400-400-10,resnet20-3x32x32``
(``resnet20-3x32x32``: :func:`common.resnet20`, ResNet-20 with parameter-free GroupNorm, N = 5000
random CIFAR-shaped images). A contender that fails records its error and the rest go on.

Run ``python benchmarks/bench_compiled.py [--quick] [--device cuda] [--budget S]``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_step import BATCH, SIZES, STEP_SIZES, make_case
from common import (
    BayesNet,
    HandSGLD,
    bench_parser,
    fmt_us,
    interleaved,
    machine_info,
    paired_ratio,
    ratio,
    report,
    resnet20,
    set_threads,
    site_values,
    strip_rounds,
)

import pyro_bnp

CONTENDERS = (
    ("identity", False, "sgld"),
    ("identity", True, "sgld"),
    ("rmsprop", False, "sgld"),
    ("rmsprop", True, "sgld"),
    ("identity", True, "sghmc"),
    ("bnp", False, "sgld"),
    ("bnp", True, "sgld"),
    ("bnp+rmsprop", True, "sgld"),
    ("identity", "unroll", "sgld"),
    ("bnp", "unroll", "sgld"),
)
UNROLL = 10
CUDAGRAPHS = ("identity", "cudagraphs", "sgld")  # (pre, compile flag, sampler)
# targets of issue 16 (compiled identity / hand) per network
TARGETS = {"mlp-10-50-1": 0.5, "mlp-784-400-400-10": 0.9}


def label(pre: str, compiled: bool, sampler: str) -> str:
    """Return a contender's name, e.g. ``"rmsprop compiled"``."""
    mode = {False: "eager", True: "compiled", "cudagraphs": "compiled cudagraphs",
            "unroll": f"compiled unroll{UNROLL}"}[compiled]  # fmt: skip
    return ("sghmc " if sampler == "sghmc" else "") + f"{pre} {mode}"


def get_case(name: str, n: int) -> dict[str, Any]:
    """bench_step's cases plus ``resnet20-3x32x32`` (categorical, random images)."""
    if name != "resnet20-3x32x32":
        return make_case(name, n)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {"name": name, "net": resnet20(), "x": x, "y": y, "likelihood": "categorical"}


def kernel_step(
    case: dict[str, Any], pre: str, compiled: bool | str, sampler: str, eps: float, device: str
) -> tuple[Callable[[], None], Any, dict[str, float]]:
    """Return ``step()`` (one ``sample`` call), the kernel and its compile times (s)."""
    model = BayesNet(case["net"], case["likelihood"], sigma=0.1).to(device)
    opts: dict[str, Any] = {"subsample_size": {"data": BATCH}, "preconditioner": pre}
    if compiled == "cudagraphs":
        compiled, opts["compile_options"] = True, {"triton.cudagraphs": True}
    elif compiled == "unroll":
        compiled, opts["compile_options"] = True, {"unroll": UNROLL, "checks": "device"}
        opts["thin"] = UNROLL
    if sampler == "sghmc":
        h = math.sqrt(eps * (2.0 - 0.1) / 2.0)
        kernel: Any = pyro_bnp.SGHMC(model, h, friction=0.1 / h, compile=compiled, **opts)
    else:
        kernel = pyro_bnp.SGLD(model, eps, compile=compiled, **opts)
    kernel.initial_params = {k: v.to(device) for k, v in site_values(case["net"]).items()}
    torch.manual_seed(0)
    kernel.setup(0, case["x"].to(device), case["y"].to(device))
    state = {"z": kernel.initial_params}

    def step() -> None:
        state["z"] = kernel.sample(state["z"])

    start = time.perf_counter()
    step()  # the first draw: traces and compiles
    if device != "cpu":
        torch.cuda.synchronize()
    times = {"first_draw_s": time.perf_counter() - start}
    comp = kernel._compiled
    if compiled:
        if comp is None:
            raise RuntimeError(f"{label(pre, compiled, sampler)}: the kernel fell back to eager")
        times.update(trace_s=comp.trace_seconds, inductor_s=comp.compile_seconds)
    return step, kernel, times


def bench_case(
    name: str, *, quick: bool, budget_s: float, device: str, which: tuple[tuple[Any, ...], ...]
) -> dict[str, Any]:
    """Time every contender of ``which`` (and the hand step) on one network."""
    case = get_case(name, 1_000 if quick else SIZES.get(name, 5_000))
    eps = STEP_SIZES.get(name, 1e-7)
    net = copy.deepcopy(case["net"]).to(device)
    hand = HandSGLD(net, case["x"].to(device), case["y"].to(device), BATCH, eps, case["likelihood"])
    contenders: dict[str, Callable[[], Any]] = {"hand": hand.step}
    compile_times, kernels, errors = {}, {}, {}
    for pre, compiled, sampler in which:
        key = label(pre, compiled, sampler)
        try:
            contenders[key], kernels[key], compile_times[key] = kernel_step(
                case, pre, compiled, sampler, eps, device
            )
        except Exception as exc:  # record it, time the others
            errors[key] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{device} {name} {key}: FAILED {errors[key][:300]}", flush=True)
    timings = interleaved(
        contenders,
        warmup=2 if quick else 30,
        budget_s=budget_s,
        block_s=0.002 if quick else 0.02,
        min_rounds=3 if quick else 5,
        sync=torch.cuda.synchronize if device != "cpu" else None,
    )
    for key, kernel in kernels.items():  # per update: a call of a thinned kernel makes `thin`
        t = timings[key]
        for field in ("median_us", "q25_us", "q75_us"):
            t[field] /= kernel.thin
        t["round_us"] = [x / kernel.thin for x in t["round_us"]]
        t["updates_per_call"] = kernel.thin
    for k in kernels.values():
        k.cleanup()
    base = "hand"
    return {
        "case": name,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device != "cpu" else None,
        "errors": errors,
        "step_size": eps,
        "timings": strip_rounds(timings),
        "compile_times": compile_times,
        "baseline": base,
        "ratio": {c: ratio(timings, c, base) for c in timings},
        "paired_ratio": {c: paired_ratio(timings, c, base) for c in timings},
        "compiled_over_eager": {
            pre: paired_ratio(timings, f"{pre} compiled", f"{pre} eager")
            for pre in ("identity", "rmsprop", "bnp")
            if f"{pre} compiled" in timings and f"{pre} eager" in timings
        },
        # issue 16's target: BNP's overhead over identity, both compiled (<= 1.10)
        "bnp_overhead_compiled": (
            paired_ratio(timings, "bnp compiled", "identity compiled")
            if "bnp compiled" in timings and "identity compiled" in timings
            else None
        ),
        "bnp_overhead_unrolled": (
            paired_ratio(
                timings, f"bnp compiled unroll{UNROLL}", f"identity compiled unroll{UNROLL}"
            )
            if f"bnp compiled unroll{UNROLL}" in timings
            and f"identity compiled unroll{UNROLL}" in timings
            else None
        ),
        "divergences": {k: len(v.diagnostics()["divergences"]) for k, v in kernels.items()},
    }


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """One row per contender and network, and the compiled/eager ratios."""
    rows = []
    for c in result["cases"]:
        base, target = c["baseline"], TARGETS.get(c["case"])
        for name, t in c["timings"].items():
            value = fmt_us(t["median_us"])
            if name != base:
                value += f"  ({c['ratio'][name]:.2f}x {base}, paired {c['paired_ratio'][name]:.2f})"
            tgt = st = ""
            if name == "identity compiled" and target is not None and base == "hand":
                tgt = f"<= {target:.1f}x hand"
                st = "ok" if c["ratio"][name] <= target else "MISSED"
            ct = c["compile_times"].get(name, {})
            if "trace_s" in ct:
                value += f"  [trace {ct['trace_s']:.1f} s, inductor {ct['inductor_s']:.1f} s]"
            rows.append({"case": f"{c['device']} {c['case']} {name}", "value": value,
                         "target": tgt, "status": st})  # fmt: skip
        for pre, r in c["compiled_over_eager"].items():
            rows.append({"case": f"{c['device']} {c['case']} {pre} compiled/eager",
                         "value": f"{r:.3f}x (paired)"})  # fmt: skip
        for key, what in (("bnp_overhead_compiled", "compiled"),
                          ("bnp_overhead_unrolled", f"compiled unroll{UNROLL}")):  # fmt: skip
            r = c.get(key)
            if r is None:
                continue
            rows.append({"case": f"{c['device']} {c['case']} bnp/identity {what}",
                         "value": f"{r:.3f}x (paired)", "target": "<= 1.10",
                         "status": "ok" if r <= 1.10 else "MISSED"})  # fmt: skip
        for name, err in c["errors"].items():
            rows.append({"case": f"{c['device']} {c['case']} {name}", "value": "FAILED",
                         "status": err.splitlines()[0][:120]})  # fmt: skip
    return rows


def main() -> None:
    """Parse the options, run, print the table and write the JSON."""
    parser = bench_parser(__doc__, "compiled")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--cases", default="mlp-10-50-1,mlp-784-400-400-10,cnn-3x32x32",
        help="comma-separated; also resnet20-3x32x32",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=None, help="timed seconds per case")
    parser.add_argument(
        "--contenders", default=None,
        help="comma-separated labels (default: CONTENDERS; on cuda also the CUDA graphs one)",
    )  # fmt: skip
    args = parser.parse_args()
    set_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 30.0)
    everything = CONTENDERS + ((CUDAGRAPHS,) if args.device != "cpu" else ())
    which = everything
    if args.contenders:
        wanted = set(args.contenders.split(","))
        which = tuple(c for c in everything if label(*c) in wanted)
        if unknown := wanted - {label(*c) for c in which}:
            parser.error(
                f"unknown contenders {sorted(unknown)}; known: {[label(*c) for c in everything]}"
            )
    cases = [
        bench_case(n, quick=args.quick, budget_s=budget, device=args.device, which=which)
        for n in args.cases.split(",")
    ]
    result = {
        "benchmark": "compiled",
        "description": "per-update cost of SGLD/SGHMC.sample with compile=True vs eager",
        "quick": args.quick,
        "machine": machine_info(),
        "torch": torch.__version__,
        "cases": cases,
    }
    result["summary"] = summary_rows(result)
    report(result, args.out)


if __name__ == "__main__":
    main()

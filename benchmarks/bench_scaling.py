"""Benchmark 3: SGLD step time against the number of data rows N, beside full-data gradients.

10-50-1 tanh MLP, Gaussian likelihood, batch 128, N = 1e3, 1e4, 1e5, 1e6 rows. Two interleaved
loops (see :mod:`common`):

* steps: ``SGLD.sample`` (``identity`` and ``bnp``) and the hand-written torch step at every N,
  all in one round-robin loop; the target is a step time flat within 1.2x from N = 1e3 to 1e6;
* full-data gradients at every N: a hand-written torch forward/backward on all rows (the least
  any full-data sampler pays per gradient) and Pyro's ``potential_grad`` of
  ``initialize_model``'s potential (what Pyro's HMC/NUTS pay per leapfrog step).

Run ``python benchmarks/bench_scaling.py [--quick]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from bench_step import ours
from common import (
    BayesNet,
    HandSGLD,
    bench_parser,
    fmt_us,
    interleaved,
    machine_info,
    mlp,
    report,
    set_threads,
    site_values,
    status,
    strip_rounds,
)
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad
from torch import nn

BATCH = 128
# eps scales as 1 / N (the gradient of U_hat does as N); the time does not depend on it
STEP_SIZE_TIMES_N = 1e-4
FLAT_TARGET = 1.2


def make_data(n: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = mlp([10, 50, 1], nn.Tanh)
    x = torch.randn(n, 10, generator=g)
    with torch.no_grad():
        y = mlp([10, 50, 1], nn.Tanh)(x).squeeze(-1) + 0.1 * torch.randn(n, generator=g)
    return {"net": net, "x": x, "y": y, "likelihood": "gaussian"}


def pyro_full_grad(case: dict[str, Any]) -> Callable[[], None]:
    model = BayesNet(case["net"], "gaussian", sigma=0.1)
    _, potential_fn, _, _ = initialize_model(
        model, model_args=(case["x"], case["y"]), initial_params=site_values(case["net"])
    )
    z = site_values(case["net"])

    def grad() -> None:
        potential_grad(potential_fn, z)

    return grad


def run(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    set_threads(threads)
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    steps: dict[str, Callable[[], Any]] = {}
    full: dict[str, Callable[[], Any]] = {}
    kernels = {}
    for n in sizes:
        case = make_data(n)
        eps = STEP_SIZE_TIMES_N / n
        hand = HandSGLD(copy.deepcopy(case["net"]), case["x"], case["y"], BATCH, eps, "gaussian")
        steps[f"hand@{n}"] = hand.step
        for pre in ("identity", "bnp"):
            steps[f"{pre}@{n}"], kernels[f"{pre}@{n}"] = ours(case, pre, eps)
        full[f"hand_full_grad@{n}"] = hand.full_gradient
        full[f"pyro_full_grad@{n}"] = pyro_full_grad(case)
    step_t = interleaved(
        steps,
        warmup=2 if quick else 30,
        budget_s=0.3 if quick else 40.0,
        block_s=0.002 if quick else 0.02,
        min_rounds=3 if quick else 5,
    )
    full_t = interleaved(full, warmup=1, budget_s=0.2 if quick else 25.0, block_s=0.0, min_rounds=3)
    divergences = {name: len(k.diagnostics()["divergences"]) for name, k in kernels.items()}
    for k in kernels.values():
        k.cleanup()
    lo, hi = sizes[0], sizes[-1]
    flat = {
        pre: step_t[f"{pre}@{hi}"]["median_us"] / step_t[f"{pre}@{lo}"]["median_us"]
        for pre in ("hand", "identity", "bnp")
    }
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "description": "SGLD step time vs N (10-50-1 MLP, batch 128) and full-data gradient cost",
        "quick": quick,
        "machine": machine_info(),
        "sizes": sizes,
        "batch_size": BATCH,
        "step_timings": strip_rounds(step_t),
        "full_gradient_timings": strip_rounds(full_t),
        "step_ratio_largest_to_smallest": flat,
        "divergences": divergences,
        "full_grad_over_bnp_step": {
            n: full_t[f"pyro_full_grad@{n}"]["median_us"] / step_t[f"bnp@{n}"]["median_us"]
            for n in sizes
        },
    }
    rows = []
    for n in sizes:
        parts = [
            f"{c}={fmt_us(step_t[f'{c}@{n}']['median_us'])}" for c in ("hand", "identity", "bnp")
        ]
        fg = [f"{c}={fmt_us(full_t[f'{c}_full_grad@{n}']['median_us'])}" for c in ("hand", "pyro")]
        rows.append(
            {
                "bench": "scaling",
                "case": f"N={n:.0e} step",
                "value": ", ".join(parts),
                "target": "",
                "status": "",
            }
        )
        rows.append(
            {
                "bench": "scaling",
                "case": f"N={n:.0e} full-data grad",
                "value": ", ".join(fg),
                "target": "",
                "status": "",
            }
        )
    for pre in ("identity", "bnp"):
        rows.append(
            {
                "bench": "scaling",
                "case": f"{pre} step N={hi:.0e} / N={lo:.0e}",
                "value": f"{flat[pre]:.3f}x",
                "target": f"<= {FLAT_TARGET:.1f}x",
                "status": status(flat[pre], FLAT_TARGET),
            }
        )
    result["summary"] = rows
    return result


def main() -> None:
    parser = bench_parser(__doc__, "scaling")
    args = parser.parse_args()
    result = run(args.quick, args.threads)
    report(result, args.out)


if __name__ == "__main__":
    main()

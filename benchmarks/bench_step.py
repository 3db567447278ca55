"""Benchmarks 1-2: cost of one SGLD step, ours against a hand-written torch step and others.

Per network (10-50-1 tanh MLP with a Gaussian likelihood; 784-400-400-10 ReLU MLP and a small
CNN on 3x32x32, both categorical; random data of MNIST / CIFAR shape; batch 128), the
contenders, interleaved round-robin in one loop (see :mod:`common`):

* ``hand``: a hand-written torch SGLD step on the equivalent ``nn.Module`` (mini-batch indexing,
  forward, log likelihood + log prior, backward, in-place update with Gaussian noise);
* ``identity``, ``rmsprop``, ``bnp``, ``bnp+rmsprop``: ``pyro_bnp.SGLD.sample`` with ``thin=1``
  after ``kernel.setup(...)``, one contender per preconditioner; ``bnp-frozen``: BNP after
  ``freeze_after_warmup`` froze its statistics (constant ``M``: what the sampling phase of
  such a run costs; ``bnp`` updates the running statistics every step);
* ``sghmc identity``, ``sghmc rmsprop``, ... (issue 15): ``pyro_bnp.SGHMC.sample`` with the
  same preconditioners, at the step size ``h`` of the same linear stability as SGLD's ``eps``
  (``h = sqrt(eps (2 - c) / 2)``, friction ``c / h``, ``c = 0.1``), in the same round-robin, so
  ``sghmc_over_sgld`` (the median of SGHMC's step over SGLD's, per preconditioner) compares
  them under the same load;
* ``identity compiled``, ``bnp compiled`` (issue 16): the same kernels with ``compile=True``
  (:mod:`pyro_bnp.compiled`, one graph per update); not in ``--quick`` runs (compilation takes
  seconds); :mod:`bench_compiled` has the full comparison. Their compile times are reported
  apart (``compile_s``), outside the timed blocks;
* ``pyro_grad``: ``pyro.ops.integrator.potential_grad`` of the ``potential_fn`` that
  ``pyro.infer.mcmc.util.initialize_model`` builds for the same model, fed the same mini-batch
  (``pyro.plate(..., subsample=idx)``), plus a plain in-place SGLD update;
* ``posteriors``: ``posteriors.sgmcmc.sgld`` (``torch.func`` on the plain network), when the
  library is importable (it is not a dependency of this project).

Reported: per-step medians (us), the ratio to ``hand``, the BNP overhead over ``identity``
(eager, and compiled over compiled), SGHMC's step over SGLD's per preconditioner.
Run ``python benchmarks/bench_step.py [--quick] [--profile]``; ``--profile`` prints cProfile
tables of one ``SGLD.sample`` step instead of timing.
"""

from __future__ import annotations

import copy
import cProfile
import io
import math
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    Batches,
    BayesNet,
    HandSGLD,
    bench_parser,
    fmt_us,
    interleaved,
    log_lik_sum,
    machine_info,
    mlp,
    num_params,
    paired_ratio,
    ratio,
    report,
    set_threads,
    site_values,
    small_cnn,
    status,
    strip_rounds,
)
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad
from torch import Tensor, nn

import pyro_bnp

PRECONDITIONERS = ("identity", "rmsprop", "bnp", "bnp+rmsprop", "bnp-frozen")
SGHMC_DECAY = 0.1  # h * friction of the SGHMC contenders
FROZEN_WARMUP = 5
BATCH = 128
# targets from the issue: ours (identity, i.e. the same algorithm) / hand-written
TARGETS = {"mlp-10-50-1": 2.0, "mlp-784-400-400-10": 1.2}
BNP_OVERHEAD_TARGET = 1.10
COMPILED = ("identity", "bnp")  # the compiled contenders (not in --quick runs)


def make_case(name: str, n: int, seed: int = 0) -> dict[str, Any]:
    """Network, data and likelihood of one benchmark case."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp-10-50-1":
        net: nn.Module = mlp([10, 50, 1], nn.Tanh)
        x = torch.randn(n, 10, generator=g)
        with torch.no_grad():
            y = mlp([10, 50, 1], nn.Tanh)(x).squeeze(-1) + 0.1 * torch.randn(n, generator=g)
        lik = "gaussian"
    elif name == "mlp-784-400-400-10":
        net = mlp([784, 400, 400, 10], nn.ReLU)
        x = torch.rand(n, 784, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        lik = "categorical"
    elif name == "cnn-3x32x32":
        net = small_cnn(10)
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        lik = "categorical"
    else:
        raise ValueError(name)
    return {"name": name, "net": net, "x": x, "y": y, "likelihood": lik}


def ours(
    case: dict[str, Any],
    pre: str,
    step_size: float,
    seed: int = 0,
    pkg: Any = pyro_bnp,
    sampler: str = "sgld",
    compile: bool = False,
) -> tuple[Callable, Any]:
    """``SGLD.sample`` (or ``SGHMC.sample``) in a loop (thin=1), from the same initial weights.

    ``pre="bnp-frozen"``: ``BNP(freeze_after_warmup=True)`` after a warmup of
    ``FROZEN_WARMUP`` updates (run here, untimed): the statistics and ``M`` are constant.
    ``pkg``: the pyro_bnp package to time (``compare_step.py`` passes an older version).
    ``sampler="sghmc"``: ``SGHMC`` at ``h = sqrt(step_size (2 - c) / 2)``, friction ``c / h``.
    ``compile=True``: the compiled update (compiled at the first call of ``step``).
    """
    model = BayesNet(case["net"], case["likelihood"], sigma=0.1)
    frozen = pre == "bnp-frozen"
    preconditioner: Any = pkg.BNP(freeze_after_warmup=True) if frozen else pre
    extra = {"compile": True} if compile else {}  # (older versions of pkg have no compile=)
    if sampler == "sghmc":
        h = math.sqrt(step_size * (2.0 - SGHMC_DECAY) / 2.0)
        kernel = pkg.SGHMC(
            model,
            h,
            friction=SGHMC_DECAY / h,
            subsample_size={"data": BATCH},
            preconditioner=preconditioner,
            **extra,
        )
    else:
        kernel = pkg.SGLD(
            model,
            step_size,
            subsample_size={"data": BATCH},
            preconditioner=preconditioner,
            **extra,
        )
    kernel.initial_params = site_values(case["net"])
    torch.manual_seed(seed)
    kernel.setup(FROZEN_WARMUP if frozen else 0, case["x"], case["y"])
    state = {"z": kernel.initial_params}

    def step() -> None:
        state["z"] = kernel.sample(state["z"])

    for _ in range(FROZEN_WARMUP if frozen else 0):
        step()
    return step, kernel


def pyro_grad(case: dict[str, Any], step_size: float, seed: int = 0) -> Callable[[], None]:
    """Pyro's ``potential_grad`` of ``initialize_model``'s potential on the same mini-batch."""
    model = BayesNet(case["net"], case["likelihood"], sigma=0.1)
    batches = Batches(case["x"].shape[0], BATCH, seed)
    model.subsample = batches.next()
    _, potential_fn, _, _ = initialize_model(
        model, model_args=(case["x"], case["y"]), initial_params=site_values(case["net"])
    )
    state = {"z": site_values(case["net"])}
    half, noise = 0.5 * step_size, math.sqrt(step_size)
    g = torch.Generator().manual_seed(seed + 1)

    def step() -> None:
        model.subsample = batches.next()
        grads, _ = potential_grad(potential_fn, state["z"])
        with torch.no_grad():
            for k, v in state["z"].items():
                v.add_(grads[k], alpha=-half).add_(torch.randn(v.shape, generator=g), alpha=noise)

    return step


def posteriors_step(case: dict[str, Any], step_size: float, seed: int = 0) -> Callable | None:
    """``posteriors.sgmcmc.sgld`` on the plain network (``None`` if not importable)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from posteriors.sgmcmc import sgld
    except Exception:
        return None
    net = copy.deepcopy(case["net"])
    x, y, lik = case["x"], case["y"], case["likelihood"]
    scale = x.shape[0] / BATCH
    batches = Batches(x.shape[0], BATCH, seed)

    def log_posterior(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Any:
        xb, yb = batch
        out = torch.func.functional_call(net, params, (xb,))
        prior = sum(p.square().sum() for p in params.values())
        return scale * log_lik_sum(out, yb, lik, 0.1) - 0.5 * prior, out

    # posteriors' update is theta + lr grad log p + N(0, 2 lr T): its lr is our eps / 2
    transform = sgld.build(log_posterior, lr=0.5 * step_size)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    state = {"s": transform.init(params)}
    torch.manual_seed(seed + 2)

    def step() -> None:
        idx = batches.next()
        state["s"], _ = transform.update(state["s"], (x[idx], y[idx]), inplace=True)

    return step


STEP_SIZES = {"mlp-10-50-1": 1e-7, "mlp-784-400-400-10": 1e-7, "cnn-3x32x32": 1e-7}
SIZES = {"mlp-10-50-1": 10_000, "mlp-784-400-400-10": 10_000, "cnn-3x32x32": 5_000}


def bench_case(name: str, *, quick: bool, budget_s: float) -> dict[str, Any]:
    case = make_case(name, 1_000 if quick else SIZES[name])
    eps = STEP_SIZES[name]
    hand = HandSGLD(
        copy.deepcopy(case["net"]), case["x"], case["y"], BATCH, eps, case["likelihood"]
    )
    contenders: dict[str, Callable[[], Any]] = {"hand": hand.step}
    kernels = {}
    for pre in PRECONDITIONERS:
        contenders[pre], kernels[pre] = ours(case, pre, eps)
    for pre in PRECONDITIONERS:
        key = f"sghmc {pre}"
        contenders[key], kernels[key] = ours(case, pre, eps, sampler="sghmc")
    compile_s = {}
    for pre in () if quick else COMPILED:
        key = f"{pre} compiled"
        contenders[key], kernels[key] = ours(case, pre, eps, compile=True)
        start = time.perf_counter()
        contenders[key]()  # the first draw traces and compiles: not timed
        compile_s[key] = time.perf_counter() - start
        if kernels[key]._compiled is None:
            raise RuntimeError(f"{name} {key}: the kernel fell back to the eager update")
    contenders["pyro_grad"] = pyro_grad(case, eps)
    post = posteriors_step(case, eps)
    if post is not None:
        contenders["posteriors"] = post
    timings = interleaved(
        contenders,
        warmup=2 if quick else 30,
        budget_s=budget_s,
        block_s=0.002 if quick else 0.02,
        min_rounds=3 if quick else 5,
    )
    divergences = {pre: len(k.diagnostics()["divergences"]) for pre, k in kernels.items()}
    for k in kernels.values():
        k.cleanup()
    ratios = {c: ratio(timings, c, "hand") for c in timings}
    return {
        "case": name,
        "num_params": num_params(case["net"]),
        "num_data": int(case["x"].shape[0]),
        "batch_size": BATCH,
        "likelihood": case["likelihood"],
        "step_size": eps,
        "timings": strip_rounds(timings),
        "ratio_to_hand": ratios,
        "paired_ratio_to_hand": {c: paired_ratio(timings, c, "hand") for c in timings},
        "bnp_overhead": ratio(timings, "bnp", "identity"),
        "bnp_overhead_paired": paired_ratio(timings, "bnp", "identity"),
        "bnp_frozen_overhead": ratio(timings, "bnp-frozen", "identity"),
        "bnp_frozen_overhead_paired": paired_ratio(timings, "bnp-frozen", "identity"),
        "bnp_rmsprop_over_rmsprop": ratio(timings, "bnp+rmsprop", "rmsprop"),
        "compile_s": compile_s,
        **(
            {
                "bnp_compiled_overhead": ratio(timings, "bnp compiled", "identity compiled"),
                "bnp_compiled_overhead_paired": paired_ratio(
                    timings, "bnp compiled", "identity compiled"
                ),
            }
            if compile_s
            else {}
        ),
        "sghmc_over_sgld": {pre: ratio(timings, f"sghmc {pre}", pre) for pre in PRECONDITIONERS},
        "sghmc_over_sgld_paired": {
            pre: paired_ratio(timings, f"sghmc {pre}", pre) for pre in PRECONDITIONERS
        },
        "divergences": divergences,
        "hand_finite": all(bool(torch.isfinite(p).all()) for p in hand.params),
    }


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for c in result["cases"]:
        t, r = c["timings"], c["ratio_to_hand"]
        case = c["case"]
        target = TARGETS.get(case)
        for name in t:
            value = fmt_us(t[name]["median_us"])
            if name != "hand":
                value += f"  ({r[name]:.2f}x hand)"
            tgt, st = "", ""
            if target is not None and name in ("identity", "bnp"):
                tgt, st = f"<= {target:.1f}x hand", status(r[name], target)
            rows.append({"bench": "step", "case": f"{case} {name}", "value": value, "target": tgt,
                         "status": st})  # fmt: skip
        pairs = [("bnp", "bnp"), ("bnp_frozen", "bnp-frozen")]
        if "bnp_compiled_overhead" in c:
            pairs.append(("bnp_compiled", "bnp compiled"))
        for key, label in pairs:
            ov = c[f"{key}_overhead"]
            rows.append(
                {
                    "bench": "bnp overhead",
                    "case": f"{case} {label}/identity"
                    + (" compiled" if "compiled" in label else ""),
                    "value": f"{ov:.3f}x (paired {c[f'{key}_overhead_paired']:.3f}x)",
                    "target": f"<= {BNP_OVERHEAD_TARGET:.2f}x",
                    "status": status(ov, BNP_OVERHEAD_TARGET),
                }
            )
        for pre in PRECONDITIONERS:
            rows.append(
                {
                    "bench": "sghmc/sgld",
                    "case": f"{case} {pre}",
                    "value": f"{c['sghmc_over_sgld'][pre]:.3f}x "
                    f"(paired {c['sghmc_over_sgld_paired'][pre]:.3f}x)",
                    "target": "",
                    "status": "",
                }
            )
    return rows


def run(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    set_threads(threads)
    names = ["mlp-10-50-1", "mlp-784-400-400-10", "cnn-3x32x32"]
    budget = 0.3 if quick else 40.0
    cases = [bench_case(n, quick=quick, budget_s=budget) for n in names]
    result = {
        "benchmark": "step",
        "description": "per-step cost of SGLD.sample (thin=1) vs a hand-written torch step",
        "quick": quick,
        "machine": machine_info(),
        "cases": cases,
    }
    result["summary"] = summary_rows(result)
    return result


# ------------------------------------------------------------------------------ profile
def profile(name: str, pre: str, steps: int = 300, top: int = 25) -> str:
    """Return a cProfile table (sorted by own time) of ``steps`` calls of ``SGLD.sample``."""
    case = make_case(name, SIZES[name])
    step, kernel = ours(case, pre, STEP_SIZES[name])
    for _ in range(30):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    kernel.cleanup()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main() -> None:
    parser = bench_parser(__doc__, "step")
    parser.add_argument("--profile", action="store_true", help="print cProfile tables instead")
    args = parser.parse_args()
    if args.profile:
        set_threads(args.threads)
        for name in ("mlp-10-50-1", "mlp-784-400-400-10"):
            for pre in ("identity", "bnp"):
                print(f"===== {name} {pre}")
                print(profile(name, pre))
        return
    result = run(args.quick, args.threads)
    report(result, args.out)


if __name__ == "__main__":
    main()

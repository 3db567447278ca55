"""Early convergence of SGLD with and without BNP on badly scaled, non-centred inputs.

Run with ``python examples/early_convergence.py [--quick] [--out DIR]``. The paper claims that
BNP improves the early convergence of SGLD; this script measures it on two problems that share
the same inputs, features ``x_j ~ N(m_j, s_j^2)`` with scales log-spaced over 0.3..3 (a variance
ratio of 100, which is exactly ``1 / eps1`` of BNP's relative variance floor, ``eps1 = 1e-2``,
so BNP can undo all of it) and non-centred means 1, -2, 3, -4, 5:

(a) conjugate linear regression with known noise (exact Gaussian posterior): metric is the
    Mahalanobis distance ``sqrt((theta - mu)^T Sigma^-1 (theta - mu))`` of the current iterate
    to the exact posterior mean; a posterior draw sits at about ``sqrt(d + 1)``, the target is
    ``3 sqrt(d + 1)``;
(b) a one-hidden-layer BNN (``bnn.BNN``, 32 tanh units) on ``y = f(x) + noise`` with a
    nonlinear ``f``: metric is the test NLL of the current draw (Gaussian predictive with the
    draw's ``sigma``, on held-out rows); the target is a fixed NLL level.

For plain SGLD (``identity``), pSGLD (``rmsprop``), BNP-SGLD (``bnp``) and ``bnp+rmsprop`` (and,
on the BNN, ``bnp-others``: ``BNP(others="rmsprop")``, RMSprop on ``sigma``), and for
``sghmc`` and ``bnp-sghmc`` (``pyro_bnp.SGHMC`` with the identity and plain BNP, friction fixed
at ``h alpha = 0.1``, step size given as the SGLD step size of the same linear stability,
``_common.sghmc_step``; grids: SGLD's and BNP-SGLD's plus one smaller value) it
runs a small log-spaced grid of step sizes, several seeds, and the same budget of gradient
evaluations (mini-batches of 100 of 2000 rows). Per method the best step size is the one with
the smallest median number of updates to reach the target (a run that never reaches it counts
as ``budget + 1``; a run that the kernel stops with a ``RuntimeError`` is a failure and counts
the same). It prints a table and writes ``results.json`` and ``early_convergence.png``.
``--methods a,b`` runs a subset of the methods (e.g. only the SGHMC rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import _common
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from bnn import BNN
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from torch import nn
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCALES = np.logspace(math.log10(0.3), math.log10(3.0), 5).tolist()
MEANS = [1.0, -2.0, 3.0, -4.0, 5.0]
N_TRAIN, N_TEST, BATCH = 2000, 1000, 100
PRIOR_SCALE, NOISE = 10.0, 1.0  # linear regression: prior N(0, 10^2), known noise sd 1
BNN_NOISE = 0.3
BNN_TARGET_NLL = 1.0  # fixed test-NLL level for problem (b); the oracle NLL is about 0.22

# Step-size grids (our eps = variance of the injected noise; drift eps/2 * grad U), chosen
# from short pilot runs so that each method's grid brackets its fastest stable step size.
GRIDS = {
    "linreg": {
        "identity": [1e-5, 2e-5, 4e-5],  # 6e-5 already diverges
        "rmsprop": [1e-4, 3e-4, 1e-3],
        "bnp": [3e-5, 1e-4, 3e-4],
        "bnp+rmsprop": [1e-4, 3e-4, 1e-3],
        "sghmc": [5e-6, 1e-5, 2e-5, 4e-5],  # SGLD's grid plus one smaller value
        "bnp-sghmc": [1e-5, 3e-5, 1e-4, 3e-4],  # BNP-SGLD's plus one smaller value
    },
    "bnn": {
        "identity": [3e-6, 1e-5, 2e-5],  # 3e-5 diverges
        "rmsprop": [1e-5, 3e-5, 1e-4],
        "bnp": [3e-6, 1e-5, 2e-5],  # 3e-5 diverges
        "bnp+rmsprop": [1e-5, 3e-5, 1e-4],
        "bnp-others": [1e-5, 3e-5, 1e-4],
        "sghmc": [1e-6, 3e-6, 1e-5, 2e-5],
        "bnp-sghmc": [1e-6, 3e-6, 1e-5, 2e-5],
    },
}


class LinReg(PyroModule):
    """``y ~ N(x w + b, NOISE^2)`` with ``N(0, PRIOR_SCALE^2)`` priors, float64."""

    def __init__(self, d: int) -> None:
        super().__init__()
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.linear = PyroModule[nn.Linear](d, 1).double()
        self.linear.weight = PyroSample(dist.Normal(zero, PRIOR_SCALE).expand([1, d]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(zero, PRIOR_SCALE).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.linear.weight, self.linear.bias  # noqa: B018  (sample before the plate)
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.linear(x[idx]).squeeze(-1)
            pyro.sample("y", dist.Normal(mean, NOISE), obs=y[idx])


def make_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Shared badly scaled inputs; a linear and a nonlinear response."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(SCALES, dtype=torch.float64)
    m = torch.tensor(MEANS, dtype=torch.float64)
    x = m + s * torch.randn(N_TRAIN + N_TEST, len(SCALES), generator=g, dtype=torch.float64)
    w = torch.linspace(-1.0, 1.0, len(SCALES), dtype=torch.float64) / s
    y_lin = x[:N_TRAIN] @ w + 0.7 + NOISE * torch.randn(N_TRAIN, generator=g, dtype=torch.float64)
    z = (x - m) / s  # every feature matters on its own scale
    f = torch.sin(1.5 * z[:, 0]) + 0.5 * z[:, 1] * z[:, 2] + torch.tanh(z[:, 3]) - 0.3 * z[:, 4]
    y_nl = f + BNN_NOISE * torch.randn(N_TRAIN + N_TEST, generator=g, dtype=torch.float64)
    return {
        "x": x[:N_TRAIN],
        "y_lin": y_lin,
        "x32": x[:N_TRAIN].float(),
        "y32": y_nl[:N_TRAIN].float(),
        "xt32": x[N_TRAIN:].float(),
        "yt32": y_nl[N_TRAIN:].float(),
    }


def exact_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and precision of ``[b; w]``."""
    xt = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64), x], 1)
    prec = xt.T @ xt / NOISE**2 + torch.eye(xt.shape[1], dtype=torch.float64) / PRIOR_SCALE**2
    mean = torch.linalg.solve(prec, xt.T @ y / NOISE**2)
    return mean, prec


def make_problem(name: str, data: dict[str, torch.Tensor]):
    """Return ``(model factory, model args, metric(params) -> float, target)``."""
    if name == "linreg":
        mu, prec = exact_posterior(data["x"], data["y_lin"])
        d = data["x"].shape[1]

        def metric(p: dict[str, torch.Tensor]) -> float:
            theta = torch.cat([p["linear.bias"].reshape(-1), p["linear.weight"].reshape(-1)])
            delta = theta.double() - mu
            return float(torch.sqrt(delta @ prec @ delta))

        return (lambda: LinReg(d)), (data["x"], data["y_lin"]), metric, 3.0 * math.sqrt(d + 1)

    xt, yt = data["xt32"], data["yt32"]
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def metric(p: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            h = torch.tanh(xt @ p["fc1.weight"].T + p["fc1.bias"])
            mean = (h @ p["fc2.weight"].T + p["fc2.bias"]).squeeze(-1)
            log_sigma = p["sigma"]  # unconstrained: HalfNormal's support is mapped by exp
            r = (yt - mean) / log_sigma.exp()
            return float((half_log_2pi + log_sigma + 0.5 * r**2).mean())

    d = xt.shape[1]
    return (lambda: BNN(d_in=d, hidden=32)), (data["x32"], data["y32"]), metric, BNN_TARGET_NLL


def run_one(problem, method: str, eps: float, seed: int, budget: int) -> dict:
    """One chain of ``budget`` updates; the metric after every update."""
    factory, args, metric, target = problem
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = factory()
    # bnp-others: BNP on the layers, RMSprop on sigma; sghmc / bnp-sghmc: SGHMC at the SGLD
    # step size eps of the same linear stability (h alpha = 0.1)
    kernel = _common.make_kernel(method, model, eps, subsample_size={"data": BATCH})
    trace: list[float] = []

    def hook(_kernel, params, _stage, _i):
        trace.append(metric(params))

    failed = False
    try:
        MCMC(kernel, num_samples=budget, warmup_steps=0, disable_progbar=True, hook_fn=hook).run(
            *args
        )
    except RuntimeError:
        failed = True
    values = np.full(budget, np.nan)
    values[: len(trace)] = trace
    hits = np.flatnonzero(values < target)
    evals = int(hits[0]) + 1 if hits.size and not failed else budget + 1
    final = float(np.mean(values[-max(1, budget // 10) :])) if not failed else float("nan")
    return {"trace": values, "evals": evals, "final": final, "failed": failed}


def summarize(runs: list[dict], budget: int) -> dict:
    evals = np.array([r["evals"] for r in runs], dtype=float)
    finals = np.array([r["final"] for r in runs])
    ok = np.isfinite(finals)
    return {
        "median_evals": float(np.median(evals)),
        "min_evals": float(evals.min()),
        "max_evals": float(evals.max()),
        "reached": int((evals <= budget).sum()),
        "failed": int(sum(r["failed"] for r in runs)),
        "final_mean": float(finals[ok].mean()) if ok.any() else None,
        "final_sd": float(finals[ok].std()) if ok.any() else None,
        "evals_per_seed": evals.astype(int).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 300 updates per run")
    parser.add_argument("--out", default="out/early_convergence", help="output directory")
    parser.add_argument("--problems", default="linreg,bnn", help="comma-separated subset")
    parser.add_argument(
        "--methods", default="", help="comma-separated subset of the methods (default: all)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [0, 1] if args.quick else [0, 1, 2]
    budget = 300 if args.quick else 3000
    problems = args.problems.split(",")
    chosen = [m for m in args.methods.split(",") if m]
    grids = {p: {m: g for m, g in GRIDS[p].items() if not chosen or m in chosen} for p in problems}
    if args.quick:  # keep the smoke run short: two values of each SGHMC grid
        grids = {
            p: {m: g[1:3] if _common.is_sghmc(m) else g for m, g in gp.items()}
            for p, gp in grids.items()
        }
    torch.set_num_threads(1)

    data = make_data(seed=12345)
    jobs = [(p, m, e, s) for p in problems for m in grids[p] for e in grids[p][m] for s in seeds]
    built = {p: make_problem(p, data) for p in problems}
    raw: dict[tuple, list[dict]] = {}
    start = time.perf_counter()
    for p, m, eps, s in tqdm(jobs, desc="runs", file=sys.stderr):
        raw.setdefault((p, m, eps), []).append(run_one(built[p], m, eps, s, budget))
    elapsed = time.perf_counter() - start

    results: dict = {
        "settings": {
            "quick": args.quick,
            "budget_updates": budget,
            "seeds": seeds,
            "batch_size": BATCH,
            "n_train": N_TRAIN,
            "n_test": N_TEST,
            "scales": SCALES,
            "means": MEANS,
            "grids": grids,
            "sghmc": {
                "methods": _common.SGHMC_METHODS,
                "momentum_decay_h_alpha": _common.MOMENTUM_DECAY,
                "eps": "SGLD step size of the same linear stability, eps = 2 h^2 / (2 - h alpha)",
            },
            "seconds": elapsed,
        },
        "problems": {},
    }
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.2), squeeze=False)
    for ax, p in zip(axes[0], problems, strict=True):
        target = built[p][3]
        entry: dict = {"target": target, "methods": {}}
        label = "Mahalanobis distance" if p == "linreg" else "test NLL"
        print(f"\n[{p}] metric: {label}, target {target:.3f}, budget {budget} updates")
        print(f"{'method':<13}{'best eps':>10}{'median':>9}{'min':>7}{'max':>7}  final metric")
        for m in grids[p]:
            grid = {
                eps: summarize(raw[(p, m, eps)], budget) for eps in grids[p][m]
            }  # best: fewest median evals, then fewest failures, then lowest final metric
            best = min(
                grid,
                key=lambda e: (
                    grid[e]["median_evals"],
                    grid[e]["failed"],
                    grid[e]["final_mean"] if grid[e]["final_mean"] is not None else math.inf,
                ),
            )
            b = grid[best]
            entry["methods"][m] = {
                "best_eps": best,
                **b,
                "grid": {f"{e:g}": g for e, g in grid.items()},
            }
            if _common.is_sghmc(m):
                h, alpha = _common.sghmc_step(best)
                entry["methods"][m]["sghmc"] = {"step_size_h": h, "friction": alpha}
            fin = (
                f"{b['final_mean']:.3f} ± {b['final_sd']:.3f}"
                if b["final_mean"] is not None
                else "diverged"
            )
            print(
                f"{m:<13}{best:>10.0e}{b['median_evals']:>9.0f}{b['min_evals']:>7.0f}"
                f"{b['max_evals']:>7.0f}  {fin}  (reached {b['reached']}/{len(seeds)},"
                f" failed {b['failed']})"
            )
            traces = np.stack([r["trace"] for r in raw[(p, m, best)]])
            with np.errstate(all="ignore"):
                ax.plot(
                    np.arange(1, budget + 1),
                    np.nanmean(traces, 0),
                    label=f"{m} (eps={best:g})",
                )
        results["problems"][p] = entry
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
        ax.set_xlabel("gradient evaluations (updates)")
        ax.set_ylabel(label)
        if p == "linreg":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.0, max(3.0, target + 1))
        ax.set_title(f"({'a' if p == 'linreg' else 'b'}) {p}: mean over {len(seeds)} seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "early_convergence.png", dpi=120)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{len(jobs)} runs in {elapsed:.1f} s; wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

"""Simulation study: SGLD, pSGLD, BNP-SGLD, BNP+RMSprop, SGHMC and BNP-SGHMC on badly scaled inputs.

Run with ``python examples/simulation.py [--quick] [--out DIR] [--seeds K]``. The inputs are
the early-convergence study's (``examples/early_convergence.py``, whose data, models and exact
posterior this script imports): five features ``x_j ~ N(m_j, s_j^2)`` with means 1, -2, 3, -4,
5 and scales log-spaced over

* ``moderate``: 0.3..3 (variance ratio 1e2 = ``1 / eps1``: BNP's relative floor undoes all of it);
* ``severe``: 1e-2..1e2 (variance ratio 1e8: BNP's floor ``s^2 = var + eps1 max(var) + eps2``
  leaves the low-variance features under-preconditioned by up to ``1 / eps1``).

Three parts, each for every setting:

1. conjugate linear regression (exact Gaussian posterior ``N(mu, Sigma)``): the error of the
   *running* posterior estimates (the draws of the second half of the run so far, updates
   ``t/2..t``): Mahalanobis distance ``sqrt((m - mu)^T Sigma^-1 (m - mu))`` of the running mean
   ``m``, relative Frobenius error ``||S - Sigma||_F / ||Sigma||_F`` of the running covariance
   ``S``, mean relative error of the marginal variances ``|S_jj / Sigma_jj - 1|``, and the
   Gaussian ``KL(N(m, S) || N(mu, Sigma))`` (mean and covariance in one scale-free number);
2. a one-hidden-layer BNN (``bnn.BNN``, 32 tanh units) on a nonlinear response: test NLL of the
   running posterior predictive (the equal-weight mixture of the draws of updates ``t/2..t``);
3. condition numbers over the run of the Hessian and the empirical Fisher blocks of the output
   neurons of every ``Linear`` layer (geometric mean over the layer's neurons; for the hidden
   layer the Gauss-Newton part of the Hessian, see :class:`BNNProblem`), raw and preconditioned
   by BNP (``pyro_bnp.diagnostics.ConditionRecorder`` as the MCMC hook of the SGLD and BNP-SGLD
   runs; in BNP-SGLD runs ``P`` comes from the kernel's running layer statistics, in SGLD runs
   from the batch statistics of the evaluation rows), with ``kappa(D)`` of the layer inputs.
   BNP's blocks are measured at ``eps1 = 1e-2`` (BNP's default) and ``eps1 = 0``: the floor caps
   the rescaling BNP can do at ``kappa(D) <= sqrt(1 + 1 / eps1)``. On the severe linear model
   BNP-SGLD is also *run* with ``eps1 = 0`` (an extra method, ``bnp_eps1_0``); on the BNN,
   ``BNP(others="rmsprop")`` is run too (``bnp-others``: RMSprop on ``sigma``, session 3).

SGHMC and BNP-SGHMC (``pyro_bnp.SGHMC`` with the identity and plain BNP; issue 15) are rows of
every part, with the friction fixed at ``h alpha = 0.1`` and their step size written as the SGLD
step size ``eps`` of the same linear stability (``_common.sghmc_step``): their grids are the
grids of SGLD and BNP-SGLD plus one value below (the momentum accumulates gradient noise).

Every method gets the same budget of updates (mini-batches of 100 of 2000 rows; default 3000),
``--seeds`` seeds (default 3) and a step size picked from a small per-method grid (``GRIDS``) by
pilot chains of a fifth of the budget on two other seeds (lowest mean final running KL, resp.
running test NLL; a chain the kernel stops scores ``inf``). The moderate grids are
early_convergence's. It prints tables and writes ``results.json``, ``simulation_linreg.png``,
``simulation_bnn.png`` and ``simulation_condition.png`` to ``--out`` (default
``out/simulation``). Condition numbers are recorded every ``budget / 30`` updates. ``--quick``
(a smoke run): 120 updates, 2 seeds, 24-update pilots, a record every 12 updates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import _common
import early_convergence as ec
import matplotlib
import numpy as np
import pyro
import torch
from _common import METHODS, SGHMC_METHODS
from bnn import BNN
from early_convergence import LinReg, exact_posterior
from pyro.infer import MCMC
from tqdm import tqdm

import pyro_bnp
from pyro_bnp.diagnostics import ConditionRecorder, LayerDerivatives

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SGHMC = tuple(SGHMC_METHODS)  # "sghmc", "bnp-sghmc": rows of every part (issue 15)
EXTRA = "bnp_eps1_0"  # BNP-SGLD with eps1 = 0, run on the severe linear model only
OTHERS = "bnp-others"  # BNP(others="rmsprop"): RMSprop on the BNN's sigma, run on the BNN only
LABELS = {**_common.LABELS, EXTRA: "BNP-SGLD, eps1=0", OTHERS: "BNP, others=RMSprop"}
COLORS = {**_common.COLORS, EXTRA: "C4", OTHERS: "C5"}
SETTINGS = {
    "moderate": np.logspace(math.log10(0.3), math.log10(3.0), 5).tolist(),
    "severe": np.logspace(-2.0, 2.0, 5).tolist(),
}
PROBLEMS = ["linreg", "bnn"]
HIDDEN = 32
N_COND_ROWS = 500  # training rows on which the BNN's blocks are evaluated
EPS1_DEFAULT = 1e-2

# Step-size grids (our eps = variance of the injected noise, drift eps/2 * grad U). Moderate:
# early_convergence's grids (they bracket each method's fastest stable step), extended by one
# value where this study's pilots (a different criterion) picked an end of the grid. Severe: from
# single-seed pilots with this script's functions, extended the same way; comments give the
# first value seen to diverge.
_EC = ec.GRIDS
GRIDS: dict[str, dict[str, dict[str, list[float]]]] = {
    "moderate": {
        "linreg": {
            "identity": _EC["linreg"]["identity"],  # 4e-5 diverges
            "sghmc": [5e-6] + _EC["linreg"]["identity"],
            "rmsprop": _EC["linreg"]["rmsprop"] + [3e-3],
            "bnp": _EC["linreg"]["bnp"],
            "bnp-sghmc": [1e-5] + _EC["linreg"]["bnp"],
            "bnp+rmsprop": _EC["linreg"]["bnp+rmsprop"] + [3e-3],
        },
        "bnn": {
            "identity": _EC["bnn"]["identity"],  # 3e-5 diverges
            "sghmc": [1e-6] + _EC["bnn"]["identity"],
            "rmsprop": [3e-6] + _EC["bnn"]["rmsprop"],
            "bnp": _EC["bnn"]["bnp"],  # 3e-5 diverges, 2e-5 in some seeds
            "bnp-sghmc": [1e-6] + _EC["bnn"]["bnp"],
            "bnp+rmsprop": _EC["bnn"]["bnp+rmsprop"],
            OTHERS: _EC["bnn"]["bnp-others"],
        },
    },
    "severe": {
        "linreg": {
            "identity": [5e-8, 1e-7, 2e-7],  # 3e-7 diverges
            "sghmc": [2e-8, 5e-8, 1e-7, 2e-7],
            "rmsprop": [3e-4, 1e-3, 3e-3],
            "bnp": [3e-4, 1e-3, 1.5e-3],  # 3e-3 diverges, 2e-3 nearly
            "bnp-sghmc": [1e-4, 3e-4, 1e-3, 1.5e-3],
            "bnp+rmsprop": [1e-2, 3e-2, 1e-1],
            EXTRA: [3e-5, 1e-4, 3e-4, 1e-3],  # 2e-3 diverges
        },
        "bnn": {
            "identity": [1e-6, 3e-6, 1e-5, 3e-5],
            "sghmc": [3e-7, 1e-6, 3e-6, 1e-5, 3e-5],
            "rmsprop": [1e-5, 3e-5, 1e-4, 3e-4],
            "bnp": [3e-6, 1e-5, 3e-5, 1e-4],  # 3e-4 diverges, 3e-5 in some seeds
            "bnp-sghmc": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4],
            "bnp+rmsprop": [3e-5, 1e-4, 3e-4],
            OTHERS: [3e-6, 1e-5, 3e-5, 1e-4],  # plain BNP's grid
        },
    },
}


# --------------------------------------------------------------------------- data and problems
def make_data(scales: list[float], seed: int = 12345) -> dict[str, torch.Tensor]:
    """``early_convergence.make_data`` with the feature scales ``scales`` (same means, sizes)."""
    saved = ec.SCALES
    ec.SCALES = list(scales)  # make_data reads the module constant
    try:
        return ec.make_data(seed=seed)
    finally:
        ec.SCALES = saved


class Problem:
    """A model plus what to record of each draw and how to turn the records into errors."""

    name = ""
    record_every = 1  # updates between recorded draws

    def factory(self) -> Any:
        """Return a fresh model."""
        raise NotImplementedError

    def collect(self, params: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Return what is kept of one draw."""
        raise NotImplementedError

    def curves(self, draws: np.ndarray, iters: np.ndarray, checks: np.ndarray) -> dict:
        """Return the running error metrics at the checkpoints ``checks``."""
        raise NotImplementedError

    def derivatives(self, params: Mapping[str, torch.Tensor]) -> dict[str, LayerDerivatives]:
        """``ConditionRecorder``'s callback: layer inputs and per-row derivatives."""
        raise NotImplementedError


class LinearProblem(Problem):
    """Conjugate linear regression with known noise; exact posterior of ``[b; w]``."""

    name = "linreg"

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.x, self.y = data["x"], data["y_lin"]
        self.args = (self.x, self.y)
        self.mu, self.prec = exact_posterior(self.x, self.y)
        self.cov = torch.linalg.inv(self.prec)
        self.d = self.x.shape[1]

    def factory(self) -> Any:
        return LinReg(self.d)

    def collect(self, params: Mapping[str, torch.Tensor]) -> np.ndarray:
        theta = torch.cat([params["linear.bias"].reshape(-1), params["linear.weight"].reshape(-1)])
        return theta.detach().double().numpy()

    def curves(self, draws: np.ndarray, iters: np.ndarray, checks: np.ndarray) -> dict:
        mu, prec, cov = self.mu.numpy(), self.prec.numpy(), self.cov.numpy()
        var = np.diag(cov)
        logdet = float(np.linalg.slogdet(cov)[1])
        k = len(mu)
        out: dict[str, list[float]] = {
            "mahalanobis": [],
            "cov_rel_frob": [],
            "var_rel_err": [],
            "kl": [],
        }
        for t in checks:
            w = draws[(iters > t // 2) & (iters <= t)]
            if len(w) < 2 or not np.all(np.isfinite(w)):
                for v in out.values():
                    v.append(math.nan)
                continue
            delta = w.mean(0) - mu
            s = np.cov(w, rowvar=False)
            out["mahalanobis"].append(float(np.sqrt(delta @ prec @ delta)))
            out["cov_rel_frob"].append(float(np.linalg.norm(s - cov) / np.linalg.norm(cov)))
            out["var_rel_err"].append(float(np.mean(np.abs(np.diag(s) / var - 1.0))))
            sign, logdet_s = np.linalg.slogdet(s)
            maha2 = float(delta @ prec @ delta)
            kl = 0.5 * (np.trace(prec @ s) + maha2 - k + logdet - logdet_s)
            out["kl"].append(float(kl) if sign > 0 else math.inf)
        return out

    def derivatives(self, params: Mapping[str, torch.Tensor]) -> dict[str, LayerDerivatives]:
        w, b = params["linear.weight"].double(), params["linear.bias"].double()
        resid = (self.x @ w.T + b).squeeze(-1) - self.y
        c = torch.full((self.x.shape[0], 1), ec.NOISE**-2, dtype=torch.float64)
        return {"linear": LayerDerivatives(h=self.x, c=c, d=(resid / ec.NOISE**2)[:, None])}


class BNNProblem(Problem):
    """``bnn.BNN`` (one hidden layer of 32 tanh units, learned noise) on the nonlinear response.

    Of every ``record_every``-th draw it keeps the per-test-row log likelihood; the running
    posterior predictive at update ``t`` is the equal-weight mixture of the kept draws of updates
    ``t/2..t``. The condition-number blocks are evaluated on the first ``N_COND_ROWS`` training
    rows. Output layer: ``c = 1 / sigma^2`` (the exact Hessian block) and ``d = (f - y) / sigma^2``.
    Hidden layer: ``d = r v tanh'(a) / sigma^2`` (``r = f - y``, ``v`` the output weights) and,
    as the "Hessian", its Gauss-Newton part ``c = (v tanh'(a))^2 / sigma^2``. The exact per-row
    curvature adds ``r v tanh''(a) / sigma^2``, which is negative for many rows away from a mode:
    the exact hidden blocks were indefinite in pilots (up to all eigenvalues of a block
    non-positive), where a condition number means nothing.
    """

    name = "bnn"
    record_every = 2

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.args = (data["x32"], data["y32"])
        self.xt, self.yt = data["xt32"], data["yt32"]
        self.xc = data["x32"][:N_COND_ROWS].double()
        self.yc = data["y32"][:N_COND_ROWS].double()
        self.d = self.xt.shape[1]

    def factory(self) -> Any:
        return BNN(d_in=self.d, hidden=HIDDEN)

    def collect(self, params: Mapping[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            h = torch.tanh(self.xt @ params["fc1.weight"].T + params["fc1.bias"])
            mean = (h @ params["fc2.weight"].T + params["fc2.bias"]).squeeze(-1)
            log_sigma = params["sigma"]  # unconstrained (HalfNormal's support is mapped by exp)
            r = (self.yt - mean) / log_sigma.exp()
            ll = -0.5 * math.log(2 * math.pi) - log_sigma - 0.5 * r**2
        return ll.double().numpy()

    def curves(self, draws: np.ndarray, iters: np.ndarray, checks: np.ndarray) -> dict:
        out: list[float] = []
        for t in checks:
            w = draws[(iters > t // 2) & (iters <= t)]
            if len(w) < 1 or not np.all(np.isfinite(w)):
                out.append(math.nan)
                continue
            top = w.max(0)
            lme = top + np.log(np.mean(np.exp(w - top), 0))
            out.append(float(-lme.mean()))
        return {"nll": out}

    def derivatives(self, params: Mapping[str, torch.Tensor]) -> dict[str, LayerDerivatives]:
        w1, b1 = params["fc1.weight"].double(), params["fc1.bias"].double()
        w2, b2 = params["fc2.weight"].double(), params["fc2.bias"].double()
        inv_s2 = float(torch.exp(-2.0 * params["sigma"].double()))
        a1 = self.xc @ w1.T + b1
        h1 = torch.tanh(a1)
        resid = (h1 @ w2.T + b2).squeeze(-1) - self.yc  # f - y
        n = self.xc.shape[0]
        t1 = 1.0 - h1**2  # tanh'
        v = w2.reshape(1, -1)
        d1 = resid[:, None] * v * t1 * inv_s2
        c1 = (v * t1) ** 2 * inv_s2
        c2 = torch.full((n, 1), inv_s2, dtype=torch.float64)
        return {
            "fc1": LayerDerivatives(h=self.xc, c=c1, d=d1),
            "fc2": LayerDerivatives(h=h1, c=c2, d=(resid * inv_s2)[:, None]),
        }


def make_problem(name: str, data: dict[str, torch.Tensor]) -> Problem:
    """Return the problem ``name`` (``"linreg"`` or ``"bnn"``) on ``data``."""
    return LinearProblem(data) if name == "linreg" else BNNProblem(data)


# --------------------------------------------------------------------------- one chain
def make_preconditioner(method: str) -> str | pyro_bnp.Preconditioner:
    """Return the kernel's ``preconditioner`` argument for ``method``."""
    if method == EXTRA:
        return pyro_bnp.BNP(eps1=0.0)
    return _common.preconditioner(method)


def make_recorders(
    method: str, every: int, derivatives: Callable[..., dict[str, LayerDerivatives]]
) -> dict[str, ConditionRecorder]:
    """Condition-number recorders for a run of ``method`` (SGLD and BNP-SGLD runs only).

    BNP runs: ``P`` from the kernel's running statistics (what the sampler uses); SGLD runs:
    from the batch statistics of the evaluation rows at the current draw (what BNP would use).
    """
    if method not in ("identity", "bnp", EXTRA):
        return {}
    stats = "batch" if method == "identity" else "running"
    return {
        "eps1=1e-2": ConditionRecorder(
            derivatives, every=every, statistics=stats, eps1=EPS1_DEFAULT
        ),
        "eps1=0": ConditionRecorder(derivatives, every=every, statistics=stats, eps1=0.0),
    }


def run_chain(
    problem: Problem,
    method: str,
    eps: float,
    seed: int,
    budget: int,
    checks: np.ndarray,
    cond_every: int = 0,
) -> dict:
    """One chain of ``budget`` updates: running error curves and condition-number records.

    ``eps`` is SGLD's step size; for the SGHMC rows the SGLD step size of the same linear
    stability (``_common.make_kernel``).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kernel = _common.make_kernel(
        method,
        problem.factory(),
        eps,
        pre=None if _common.is_sghmc(method) else make_preconditioner(method),
        subsample_size={"data": ec.BATCH},
    )
    draws: list[np.ndarray] = []
    iters: list[int] = []
    recorders = make_recorders(method, cond_every, problem.derivatives) if cond_every else {}
    count = 0

    def hook(kern: Any, params: Mapping[str, torch.Tensor], stage: str, i: int) -> None:
        nonlocal count
        count += 1
        if count % problem.record_every == 0 or count == 1:
            draws.append(problem.collect(params))
            iters.append(count)
        for rec in recorders.values():
            rec(kern, params, stage, i)

    failed = False
    try:
        mcmc = MCMC(kernel, num_samples=budget, warmup_steps=0, disable_progbar=True, hook_fn=hook)
        mcmc.run(*problem.args)
    except RuntimeError:
        failed = True
    curves = problem.curves(np.array(draws), np.array(iters), checks)
    if failed:  # the kernel stopped the chain: no estimate after the failure
        curves = {k: [math.nan] * len(checks) for k in curves}
    return {
        "curves": curves,
        "failed": failed,
        "cond": {k: r.records for k, r in recorders.items()},
    }


def checkpoints(budget: int, n: int = 30) -> np.ndarray:
    """Log-spaced update counts from 16 (windows of 8 draws) to ``budget``."""
    return np.unique(np.geomspace(16, budget, n).round().astype(int))


# --------------------------------------------------------------------------- summaries
def _stack(runs: list[dict], key: str) -> np.ndarray:
    return np.array([r["curves"][key] for r in runs], dtype=float)


def _stat(values: np.ndarray) -> dict:
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {
        "mean": float(ok.mean()),
        "sd": float(ok.std()),
        "min": float(ok.min()),
        "max": float(ok.max()),
    }


def _geo(values: list[float]) -> float | None:
    v = np.array([x for x in values if x is not None and np.isfinite(x) and x > 0])
    return float(np.exp(np.log(v).mean())) if v.size else None


def summarize_cond(runs: list[dict]) -> dict:
    """Per recorder, layer and kind: first/last record (geometric mean over seeds) and series.

    At each record the geometric mean is over the seeds whose chain got that far.
    """
    out: dict = {}
    for rec_name in runs[0]["cond"]:
        for r0 in runs[0]["cond"][rec_name]:
            key = (r0["layer"], r0["kind"])
            if rec_name in out and f"{key[0]}/{key[1]}" in out[rec_name]:
                continue
            per_seed = [
                [x for x in r["cond"][rec_name] if (x["layer"], x["kind"]) == key] for r in runs
            ]
            longest = max(per_seed, key=len)  # a chain the kernel stopped has fewer records
            n = len(longest)
            entry: dict = {"call": [x["call"] for x in longest]}
            for field in ("kappa", "kappa_bnp", "kappa_D", "kappa_D_floored"):
                values = [[s[j][field] for s in per_seed if j < len(s)] for j in range(n)]
                entry[field] = [_geo(v) for v in values]
            entry["dropped_max"] = max(x["dropped"] for s in per_seed for x in s)
            entry["dropped_bnp_max"] = max(x["dropped_bnp"] for s in per_seed for x in s)
            for pos, tag in ((0, "first"), (n - 1, "last")):
                k, kb = entry["kappa"][pos], entry["kappa_bnp"][pos]
                kd = entry["kappa_D"][pos]
                entry[tag] = {
                    "kappa": k,
                    "kappa_bnp": kb,
                    "reduction": k / kb if k and kb else None,
                    "kappa_D": kd,
                    "kappa_D_sq": kd**2 if kd else None,
                    "kappa_D_floored": entry["kappa_D_floored"][pos],
                }
            out.setdefault(rec_name, {})[f"{key[0]}/{key[1]}"] = entry
    return out


# --------------------------------------------------------------------------- pilots and runs
PILOT_SEEDS = [1000, 1001]


def pilot(problem: Problem, setting: str, method: str, budget: int) -> dict:
    """Pick the step size of ``method`` from its grid by short chains (``PILOT_SEEDS``).

    Score: the final running Gaussian KL (linear model) or running test NLL (BNN), averaged
    over the pilot seeds; a chain the kernel stops scores ``inf``. Ties (all ``inf``): the
    smallest step size.
    """
    checks = np.array([budget])
    key = "kl" if problem.name == "linreg" else "nll"
    scores = {}
    for eps in GRIDS[setting][problem.name][method]:
        vals = []
        for seed in PILOT_SEEDS:
            v = run_chain(problem, method, eps, seed, budget, checks)["curves"][key][-1]
            vals.append(v if np.isfinite(v) else math.inf)
        scores[eps] = float(np.mean(vals))
    best = min(scores, key=lambda e: (scores[e], e))
    return {"best": best, "scores": {f"{e:g}": sc for e, sc in scores.items()}}


def method_list(setting: str, problem: str) -> list[str]:
    """Return the four SGLD methods, the two SGHMC rows and the extras of a setting and problem.

    BNP-SGLD with ``eps1 = 0`` on the severe linear model, ``BNP(others="rmsprop")`` on the BNN.
    """
    extra = [EXTRA] if (setting, problem) == ("severe", "linreg") else []
    return METHODS + list(SGHMC) + extra + ([OTHERS] if problem == "bnn" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 120 updates, 2 seeds")
    parser.add_argument("--out", default="out/simulation", help="output directory")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--budget", type=int, default=None, help="updates per chain")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (120 if args.quick else 3000)
    n_seeds = args.seeds or (2 if args.quick else 3)
    seeds = list(range(n_seeds))
    pilot_budget = max(budget // 5, 20)
    cond_every = max(budget // (10 if args.quick else 30), 1)
    checks = checkpoints(budget)

    problems = {(s, p): make_problem(p, make_data(SETTINGS[s])) for s in SETTINGS for p in PROBLEMS}
    pilot_jobs = [(s, p, m) for (s, p) in problems for m in method_list(s, p)]
    main_jobs = [(s, p, m, seed) for (s, p, m) in pilot_jobs for seed in seeds]
    n_pilot = len(PILOT_SEEDS) * sum(len(GRIDS[s][p][m]) for s, p, m in pilot_jobs)
    bar = tqdm(total=n_pilot + len(main_jobs), desc="chains", file=sys.stderr)
    start = time.perf_counter()
    pilots: dict = {}
    for s, p, m in pilot_jobs:
        bar.set_postfix_str(f"pilot {s} {p} {m}")
        pilots[(s, p, m)] = pilot(problems[(s, p)], s, m, pilot_budget)
        bar.update(len(PILOT_SEEDS) * len(GRIDS[s][p][m]))
    t_pilot = time.perf_counter() - start
    raw: dict = {}
    for s, p, m, seed in main_jobs:
        bar.set_postfix_str(f"{s} {p} {m} seed {seed}")
        eps = pilots[(s, p, m)]["best"]
        res = run_chain(problems[(s, p)], m, eps, seed, budget, checks, cond_every=cond_every)
        raw.setdefault((s, p, m), []).append(res)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start

    results: dict = {
        "settings": {
            "quick": args.quick,
            "budget_updates": budget,
            "pilot_updates": pilot_budget,
            "seeds": seeds,
            "pilot_seeds": PILOT_SEEDS,
            "batch_size": ec.BATCH,
            "n_train": ec.N_TRAIN,
            "n_test": ec.N_TEST,
            "means": ec.MEANS,
            "scales": SETTINGS,
            "grids": GRIDS,
            "sghmc": {
                "methods": SGHMC_METHODS,
                "momentum_decay_h_alpha": _common.MOMENTUM_DECAY,
                "eps": "SGLD step size of the same linear stability, eps = 2 h^2 / (2 - h alpha)",
            },
            "checkpoints": checks.tolist(),
            "running_window": "draws of updates t/2..t",
            "condition_every": cond_every,
            "condition_rows_bnn": N_COND_ROWS,
            "eps1_default": EPS1_DEFAULT,
            "seconds_pilots": t_pilot,
            "seconds_total": elapsed,
        },
        "results": {},
    }
    early = int(np.searchsorted(checks, budget // 10))
    for (s, p), prob in problems.items():
        entry: dict = {"methods": {}, "extra": {}}
        for m in method_list(s, p):
            runs = raw[(s, p, m)]
            res_m: dict = {
                "eps": pilots[(s, p, m)]["best"],
                "pilot": pilots[(s, p, m)]["scores"],
                "failed": int(sum(r["failed"] for r in runs)),
                "curves": {},
                "final": {},
                "early": {},
            }
            if _common.is_sghmc(m):  # the SGHMC update behind the SGLD-equivalent eps
                h, alpha = _common.sghmc_step(res_m["eps"])
                res_m["sghmc"] = {"step_size_h": h, "friction": alpha}
            for k in runs[0]["curves"]:
                arr = _stack(runs, k)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns
                    res_m["curves"][k] = {
                        "mean": np.nanmean(arr, 0).tolist(),
                        "sd": np.nanstd(arr, 0).tolist(),
                    }
                res_m["final"][k] = _stat(arr[:, -1])
                res_m["early"][k] = _stat(arr[:, early])
            if runs[0]["cond"]:
                res_m["condition"] = summarize_cond(runs)
            (entry["extra"] if m in (EXTRA, OTHERS) else entry["methods"])[m] = res_m
        if p == "linreg":
            entry["posterior_sd"] = prob.cov.diagonal().sqrt().tolist()
        results["results"][f"{s}/{p}"] = entry

    print_tables(results, int(checks[early]))
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1))
    plot_linreg(results, checks, out / "simulation_linreg.png")
    plot_bnn(results, checks, out / "simulation_bnn.png")
    plot_condition(results, out / "simulation_condition.png")
    print(
        f"\n{n_pilot} pilot + {len(main_jobs)} chains in {elapsed:.1f} s "
        f"(pilots {t_pilot:.1f} s); wrote {out / 'results.json'}"
    )


def _finite(x: Any) -> Any:
    """Replace non-finite floats by None (strict JSON), recursively."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------------------- output
def _fmt(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "failed"
    return f"{st['mean']:.{digits}g} ± {st['sd']:.2g}"


def print_tables(results: dict, t_early: int) -> None:
    """Print the error and condition-number tables."""
    res = results["results"]
    for s in SETTINGS:
        e = res[f"{s}/linreg"]
        print(f"\n[{s} / linreg] running estimates (draws of updates t/2..t), mean ± sd over seeds")
        print(
            f"{'method':<18}{'eps':>8} | {'Mahal. @' + str(t_early):>18} | {'Mahal. final':>18} | "
            f"{'KL final':>18} | {'cov rel. Frob.':>18} | {'marg. var rel.':>18} | fail"
        )
        for m, r in {**e["methods"], **e["extra"]}.items():
            f = r["final"]
            print(
                f"{LABELS[m]:<18}{r['eps']:>8.1e} | {_fmt(r['early']['mahalanobis']):>18} | "
                f"{_fmt(f['mahalanobis']):>18} | {_fmt(f['kl']):>18} | "
                f"{_fmt(f['cov_rel_frob']):>18} | {_fmt(f['var_rel_err']):>18} | {r['failed']}"
            )
        e = res[f"{s}/bnn"]
        print(f"\n[{s} / bnn] test NLL of the running posterior predictive (noise floor ~0.22)")
        print(f"{'method':<18}{'eps':>8} | {'@' + str(t_early):>14} | {'final':>14} | fail")
        for m, r in {**e["methods"], **e["extra"]}.items():
            print(
                f"{LABELS[m]:<18}{r['eps']:>8.1e} | {_fmt(r['early']['nll']):>14} | "
                f"{_fmt(r['final']['nll']):>14} | {r['failed']}"
            )
    print("\nCondition numbers of the neuron blocks at the last record (geometric mean over the")
    print("layer's neurons and the seeds). P: running statistics in BNP runs, batch statistics in")
    print("SGLD runs. red. = kappa / kappa_BNP. fc1 'hessian' = Gauss-Newton block.")
    print(
        f"{'problem':<16}{'run':<10}{'block':<15}{'kD':>9}{'kD^2':>9}{'kappa':>9}"
        f" |{'eps1=1e-2':>9}{'red.':>9} |{'eps1=0':>9}{'red.':>9}"
    )
    for key, e in res.items():
        for m in ("identity", "bnp", EXTRA):
            r = e["methods"].get(m) or e["extra"].get(m)
            if not r or "condition" not in r:
                continue
            c1, c0 = r["condition"]["eps1=1e-2"], r["condition"]["eps1=0"]
            run = {"identity": "SGLD", "bnp": "BNP", EXTRA: "BNP e1=0"}[m]
            for lk, v in c1.items():
                a, b = v["last"], c0[lk]["last"]
                print(
                    f"{key:<16}{run:<10}{lk:<15}{_g(a['kappa_D'])}{_g(a['kappa_D_sq'])}"
                    f"{_g(a['kappa'])} |{_g(a['kappa_bnp'])}{_g(a['reduction'])} |"
                    f"{_g(b['kappa_bnp'])}{_g(b['reduction'])}"
                )


def _g(x: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if x is None else f" {x:>{width - 1}.3g}"


def _band(ax: Any, x: np.ndarray, c: dict, color: str, label: str) -> None:
    mean, sd = np.array(c["mean"], dtype=float), np.array(c["sd"], dtype=float)
    ax.plot(x, mean, color=color, label=label)
    lo = np.where(mean - sd > 0, mean - sd, mean / 3)
    ax.fill_between(x, lo, mean + sd, color=color, alpha=0.15, lw=0)


def plot_linreg(results: dict, checks: np.ndarray, path: Path) -> None:
    """Running-estimate errors of the linear model, per setting and method."""
    metrics = [
        ("mahalanobis", "Mahalanobis dist. of running mean"),
        ("cov_rel_frob", "rel. Frobenius error of running cov."),
        ("var_rel_err", "mean rel. error of marginal var."),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), squeeze=False)
    for row, s in enumerate(SETTINGS):
        e = results["results"][f"{s}/linreg"]
        for col, (k, label) in enumerate(metrics):
            ax = axes[row, col]
            for m, r in {**e["methods"], **e["extra"]}.items():
                _band(ax, checks, r["curves"][k], COLORS[m], f"{LABELS[m]} ({r['eps']:.2g})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(
                f"{s} (scales {SETTINGS[s][0]:g}..{SETTINGS[s][-1]:g}): {label}", fontsize=9
            )
            ax.set_xlabel("updates (gradient evaluations)")
            if k == "mahalanobis":
                ax.axhline(1.0, color="k", lw=0.8, ls=":")
                ax.text(checks[0], 1.0, " 1 posterior sd", fontsize=7, va="bottom")
            if col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Linear model, exact posterior: error of running estimates (mean ± sd, seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_bnn(results: dict, checks: np.ndarray, path: Path) -> None:
    """Test NLL of the running posterior predictive of the BNN."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, s in zip(axes[0], SETTINGS, strict=True):
        e = results["results"][f"{s}/bnn"]
        for m, r in {**e["methods"], **e.get("extra", {})}.items():
            c = r["curves"]["nll"]
            mean, sd = np.array(c["mean"], dtype=float), np.array(c["sd"], dtype=float)
            ax.plot(checks, mean, color=COLORS[m], label=f"{LABELS[m]} ({r['eps']:.2g})")
            ax.fill_between(checks, mean - sd, mean + sd, color=COLORS[m], alpha=0.15, lw=0)
        ax.axhline(0.22, color="k", lw=0.8, ls=":", label="noise floor")
        ax.set_xscale("log")
        ax.set_ylim(0.0, 3.0)
        ax.set_xlabel("updates (gradient evaluations)")
        ax.set_ylabel("test NLL, running predictive")
        ax.set_title(f"BNN, {s} inputs (scales {SETTINGS[s][0]:g}..{SETTINGS[s][-1]:g})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_condition(results: dict, path: Path) -> None:
    """Hessian-block condition numbers over the run, raw and with BNP, per layer."""
    panels = [("linreg", "linear/hessian"), ("bnn", "fc1/hessian"), ("bnn", "fc2/hessian")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), squeeze=False)
    for row, s in enumerate(SETTINGS):
        for col, (p, lk) in enumerate(panels):
            ax = axes[row, col]
            e = results["results"][f"{s}/{p}"]
            for m, ls in (("identity", "--"), ("bnp", "-")):
                cond = e["methods"][m].get("condition")
                if not cond:
                    continue
                c1, c0 = cond["eps1=1e-2"][lk], cond["eps1=0"][lk]
                tag = LABELS[m]
                x = c1["call"]
                ax.plot(x, c1["kappa"], color="k", ls=ls, label=f"raw ({tag} run)")
                ax.plot(x, c1["kappa_bnp"], color="C2", ls=ls, label=f"BNP eps1=1e-2 ({tag} run)")
                ax.plot(x, c0["kappa_bnp"], color="C4", ls=ls, label=f"BNP eps1=0 ({tag} run)")
                if m == "bnp":
                    kd2 = [v**2 if v else np.nan for v in c1["kappa_D"]]
                    ax.plot(x, kd2, color="C7", ls=":", label="kappa(D)^2 (BNP run)")
            ax.set_yscale("log")
            ax.set_xlabel("update")
            ax.set_title(f"{s} / {p}: {lk.replace('/', ' ')} block", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Condition numbers of per-neuron Hessian blocks (geometric mean over neurons)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


if __name__ == "__main__":
    main()

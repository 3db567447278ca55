"""End-to-end demo: a Bayesian neural network sampled with BNP-SGLD, analysed with ArviZ.

Run with ``make demo`` (or ``python examples/demo.py --out demo_out``). It

1. builds a 1-32-1 tanh BNN regression (``PyroModule``) on 1000 noisy points with non-centred
   inputs,
2. samples it with :class:`pyro_bnp.SGLD` (BNP+RMSprop preconditioner, mini-batches of 100),
   2 chains (``--preconditioner bnp`` for plain BNP, which needs a smaller step size on BNNs),
3. exports the run to ArviZ (:func:`pyro_bnp.arviz.from_pyro`) and prints a summary with R-hat
   and ESS, and the PSIS-LOO estimate on the full data,
4. writes a posterior predictive plot to ``OUT/demo_ppc.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import arviz_stats as azs
import matplotlib
import pyro
import torch
from bnn import BNN, make_data
from pyro.infer import MCMC, Predictive

import pyro_bnp
from pyro_bnp.arviz import from_pyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--thin", type=int, default=4)
    # BNP+RMSprop: the best of our four samplers on BNNs (docs/experiments/early_convergence.md)
    parser.add_argument("--preconditioner", default="bnp+rmsprop")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--step-size", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for a small net)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    x, y = make_data(1000, seed=args.seed)
    net = BNN(d_in=1, hidden=32)
    kernel = pyro_bnp.SGLD(
        net,
        step_size=args.step_size,
        subsample_size={"data": 100},
        preconditioner=args.preconditioner,
        thin=args.thin,
    )
    # Two chains one after the other (the demo must also run on a 1-core machine).
    with mock.patch("torch.multiprocessing.cpu_count", return_value=1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "num_chains=2 is more than available_cpu")
        mcmc = MCMC(
            kernel,
            num_samples=args.num_samples,
            warmup_steps=args.warmup,
            num_chains=2,
            disable_progbar=not sys.stderr.isatty(),
        )
    start = time.perf_counter()
    mcmc.run(x, y)
    elapsed = time.perf_counter() - start
    updates = 2 * (args.num_samples + args.warmup) * kernel.thin
    print(
        f"sampled 2 chains, {updates} SGLD updates in {elapsed:.1f} s "
        f"({updates / elapsed:.0f} updates/s)"
    )

    dt = from_pyro(mcmc, log_likelihood=True, batch_size=500)
    print("\nArviZ summary (sigma and the output layer's bias):")
    print(azs.summary(dt, var_names=["sigma", "fc2.bias"]).to_string())
    with warnings.catch_warnings():
        # Pareto-k warnings are summarised below; the k fit divides by zero for points whose
        # importance weights degenerate (a short, unmixed BNN chain).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        loo = azs.loo(dt, pointwise=True)
    k = loo.pareto_k.values
    bad = int((~(k <= 0.7)).sum())  # nan k counts as bad
    elpd = f"{loo.elpd:.1f} (se {loo.se:.1f})" if math.isfinite(loo.elpd) else "not estimable"
    print(
        f"\nPSIS-LOO on the full data: elpd_loo = {elpd}; {bad} of {x.shape[0]} points have "
        "Pareto k > 0.7 or undefined: PSIS-LOO is unreliable for them (common for BNNs and "
        "short SGLD runs; run longer, or use K-fold cross-validation)"
        if bad
        else f"\nPSIS-LOO on the full data: elpd_loo = {elpd}; all Pareto k <= 0.7"
    )
    dt.to_netcdf(out / "demo_run.nc")

    grid = torch.linspace(float(x.min()) - 1, float(x.max()) + 1, 200).unsqueeze(-1)
    samples = {
        k: v.reshape(-1, *v.shape[2:]) for k, v in mcmc.get_samples(group_by_chain=True).items()
    }
    pred = Predictive(net, posterior_samples=samples, return_sites=["obs"])(grid)["obs"]
    lo, mid, hi = torch.quantile(pred, torch.tensor([0.05, 0.5, 0.95]), dim=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x[:, 0], y, s=4, alpha=0.4, color="k", label="data")
    ax.plot(grid[:, 0], mid, color="C0", label="posterior predictive median")
    ax.fill_between(grid[:, 0], lo, hi, color="C0", alpha=0.3, label="90% interval")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{args.preconditioner} SGLD, 1-32-1 BNN, 2 chains")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "demo_ppc.png", dpi=120)
    print(f"\nwrote {out / 'demo_ppc.png'} and {out / 'demo_run.nc'}")


if __name__ == "__main__":
    main()

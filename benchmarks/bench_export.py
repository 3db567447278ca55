"""Export time of :func:`pyro_bnp.arviz.from_pyro` for a small Bayesian neural network.

1000 posterior draws (4 chains x 250) of a 5-20-1 tanh network and 10,000 observations, exported
with ``log_likelihood=True`` and ``posterior_predictive=True``.  The draws are made up (standard
normal weights): exporting does not care how they were sampled, so no MCMC run is needed.

Two ways to write the same network:

* ``tensors``: weights sampled with ``pyro.sample`` and used with ``@``; broadcasts over a batch of
  draws, so the exporter evaluates draws vectorised;
* ``pyromodule``: :class:`pyro.nn.PyroModule` ``Linear`` layers with :class:`~pyro.nn.PyroSample`
  priors; ``F.linear`` does not broadcast over a batch of weights, so the exporter evaluates draw
  by draw.

plus, for scale, a linear regression on the same data (``linear``), where the model is so cheap
per row that vectorising over draws matters most.

Run ``python benchmarks/bench_export.py [--out benchmarks/results/export.json]``.  One torch
thread by default: on a 2-core machine shared with other jobs, two intra-op threads made every
variant 3-10x slower and the timings erratic (``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn

from pyro_bnp.arviz import from_pyro

D_IN, HIDDEN = 5, 20


def tensor_bnn(x: Tensor, y: Tensor | None = None) -> None:
    w1 = pyro.sample("fc1.weight", dist.Normal(0.0, 1.0).expand([HIDDEN, D_IN]).to_event(2))
    b1 = pyro.sample("fc1.bias", dist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
    w2 = pyro.sample("fc2.weight", dist.Normal(0.0, 1.0).expand([1, HIDDEN]).to_event(2))
    b2 = pyro.sample("fc2.bias", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]) as idx:
        h = torch.tanh(x[idx] @ w1.transpose(-1, -2) + b1.unsqueeze(-2))
        mu = (h @ w2.transpose(-1, -2)).squeeze(-1) + b2
        pyro.sample("obs", dist.Normal(mu, sigma), obs=None if y is None else y[idx])


def linear(x: Tensor, y: Tensor | None = None) -> None:
    # a linear regression on the same inputs: cheap per row, where vectorising pays most
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D_IN]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]) as idx:
        mu = (x[idx] * w).sum(-1)
        pyro.sample("obs", dist.Normal(mu, sigma), obs=None if y is None else y[idx])


class ModuleBNN(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](D_IN, HIDDEN)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([HIDDEN, D_IN]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](HIDDEN, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, HIDDEN]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: Tensor, y: Tensor | None = None) -> None:
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]) as idx:
            mu = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mu, sigma), obs=None if y is None else y[idx])


def fake_samples(chains: int, draws: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "fc1.weight": (HIDDEN, D_IN),
        "fc1.bias": (HIDDEN,),
        "fc2.weight": (1, HIDDEN),
        "fc2.bias": (1,),
    }
    out = {k: torch.randn((chains, draws, *s), generator=g) for k, s in shapes.items()}
    out["sigma"] = torch.rand((chains, draws), generator=g) + 0.5
    out["w"] = torch.randn((chains, draws, D_IN), generator=g)  # the linear model's
    return out


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/export.json")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=250)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.n, D_IN)
    y = torch.randn(args.n)
    samples = fake_samples(args.chains, args.draws)
    models: dict[str, Callable[..., None]] = {
        "tensors": tensor_bnn,
        "pyromodule": ModuleBNN(),
        "linear": linear,
    }
    cases = [
        ("tensors", None, None),
        ("tensors", None, 1000),
        ("tensors", False, None),
        ("pyromodule", None, None),
        ("pyromodule", None, 1000),
        ("linear", None, None),
        ("linear", False, None),
    ]
    rows = []
    header = f"{'model':<11} {'vectorize':<9} {'batch':>6} {'median s':>9} {'draws/s':>8}"
    print(f"{args.chains * args.draws} draws x {args.n} observations, median of {args.repeats}")
    print(header)
    print("-" * len(header))
    for name, vectorize, batch_size in cases:

        def run(name: str = name, vectorize: bool | None = vectorize, bs: int | None = batch_size):
            keep = ("w", "sigma") if name == "linear" else tuple(k for k in samples if k != "w")
            return from_pyro(
                samples={k: samples[k] for k in keep},
                model=models[name],
                model_args=(x, y),
                log_likelihood=True,
                posterior_predictive=True,
                batch_size=bs,
                vectorize=vectorize,
                seed=0,
            )

        median, times = timed(run, args.repeats)
        total = args.chains * args.draws
        rows.append(
            {
                "model": name,
                "vectorize": vectorize,
                "batch_size": batch_size,
                "median_s": median,
                "times_s": times,
                "draws_per_s": total / median,
            }
        )
        vec = "auto" if vectorize is None else str(vectorize)
        bs = "all" if batch_size is None else str(batch_size)
        print(f"{name:<11} {vec:<9} {bs:>6} {median:>9.2f} {total / median:>8.0f}")

    result = {
        "benchmark": "from_pyro export, 5-20-1 BNN, log_likelihood + posterior_predictive",
        "chains": args.chains,
        "draws": args.draws,
        "observations": args.n,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Parallel chains: Pyro's ``MCMC(num_chains=4, mp_context=...)`` against sequential chains.

A 3-16-1 BNN (``tests``-sized, N = 400, batch 40), BNP+RMSprop, 4 chains x ``--draws`` draws,
in the parent process at one torch thread. Contenders, each timed once per round (median over
``--rounds`` rounds, wall clock): ``sequential`` (``mp_context=None`` with one CPU: Pyro runs the
chains one after the other), ``spawn`` and ``fork`` (Pyro's worker processes). Spawned workers
start a fresh interpreter; before the kernel carried ``torch.get_num_threads()`` in its pickle
they ran at torch's default thread count (the contender "spawn, threads not carried" pickles
the kernel as before).

Run ``python benchmarks/bench_chains.py [--quick]``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any
from unittest import mock

import pyro
import pyro.distributions as dist
import torch
from common import bench_parser, machine_info, report
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_bnp


class Net(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](3, 16)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([16, 3]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([16]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](16, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 16]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        for layer in (self.fc1, self.fc2):
            _ = layer.weight, layer.bias
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, 0.2), obs=None if y is None else y[idx])


def _without_threads(self: Any) -> dict[str, Any]:
    """Return the kernel's pickle as before the fix (no thread count carried)."""
    return dict(self.__dict__)


def one_run(context: str | None, draws: int, carry_threads: bool = True) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = torch.sin(x.sum(-1)) + 0.2 * torch.randn(400, generator=g)
    kernel = pyro_bnp.SGLD(Net(), 1e-4, subsample_size={"data": 40}, preconditioner="bnp+rmsprop")
    kwargs: dict[str, Any] = {"num_chains": 4, "disable_progbar": True}
    if context is not None:
        kwargs["mp_context"] = context
    start = time.perf_counter()
    # Pyro runs chains in parallel only if num_chains <= cpu_count() - 1: pretend to have 5 CPUs
    # for spawn/fork (on 2 cores the workers then share them, as 4 chains on 2 cores would)
    cpus = 1 if context is None else 5
    getstate = pyro_bnp.kernel.SGMCMC.__getstate__ if carry_threads else _without_threads
    with (
        warnings.catch_warnings(),
        mock.patch("torch.multiprocessing.cpu_count", lambda: cpus),
        mock.patch.object(pyro_bnp.kernel.SGMCMC, "__getstate__", getstate),
    ):
        warnings.simplefilter("ignore")  # Pyro's "chains run sequentially" notice
        MCMC(kernel, num_samples=draws, warmup_steps=draws // 4, **kwargs).run(x, y)
    return time.perf_counter() - start


def main() -> None:
    parser = bench_parser(__doc__, "chains")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads, 1))
    draws, rounds = (40, 1) if args.quick else (args.draws, args.rounds)
    times: dict[str, list[float]] = {
        "sequential": [], "spawn": [], "fork": [], "spawn, threads not carried": []
    }  # fmt: skip
    for _ in range(rounds):
        for name in times:
            context = None if name == "sequential" else name.split(",")[0]
            times[name].append(one_run(context, draws, carry_threads="not" not in name))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {
            "case": f"4 chains x {draws} draws, {k}",
            "value": f"{med[k]:.2f} s ({med[k] / med['sequential']:.2f}x sequential)",
        }  # fmt: skip
        for k in times
    ]
    result = {"benchmark": "chains", "machine": machine_info(), "draws": draws,
              "times_s": times, "median_s": med, "summary": rows}  # fmt: skip
    report(result, args.out)


if __name__ == "__main__":
    main()

"""Models for the reliability tests (importable by subprocesses)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class SmallBNN(PyroModule):
    """3-8-1 tanh regression network with a HalfNormal noise scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](3, 8)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 3]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([8]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](8, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 8]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, sigma), obs=None if y is None else y[idx])


def data(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(n, 3, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * x[:, 1] + 0.2 * torch.randn(n, generator=g)
    return x, y


class InterruptedBNN(SmallBNN):
    """:class:`SmallBNN` that raises ``KeyboardInterrupt`` at its ``at``-th call (0-based), as a
    Ctrl-C arriving in the middle of an update's gradient evaluation would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.calls += 1
        if self.calls - 1 == self.at:
            raise KeyboardInterrupt
        super().forward(x, y)


def make_kernel(net: PyroModule | None = None):
    from pyro_bnp import BNP, SGLD, RMSprop, schedules

    return SGLD(
        SmallBNN() if net is None else net,
        step_size=schedules.Polynomial(2e-4, 50.0, 0.55),
        subsample_size={"data": 32},
        preconditioner=BNP(rmsprop=RMSprop()),
        thin=2,
    )

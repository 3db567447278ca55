"""Models for the kernel protocol tests (importable, picklable: spawned workers load them)."""

from __future__ import annotations

import math
from collections.abc import Collection

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


def _normal(shape: tuple[int, ...], dtype: torch.dtype) -> dist.Distribution:
    return dist.Normal(torch.zeros(shape, dtype=dtype), 1.0).to_event(len(shape))


class BNN(PyroModule):
    """A ``d -> hidden -> 1`` Bayesian network with a HalfNormal noise scale.

    The pattern that keeps the weights out of the data plate: a ``PyroSample`` attribute is
    sampled at its first access during ``forward`` (in whatever plates are active then) and
    cached for the rest of the call, so the layers' weights are touched *before* the plate is
    entered; the layers can then be called on the mini-batch inside the plate.
    ``seen`` records the shape of every mini-batch the network is called on.
    """

    def __init__(self, d: int = 3, hidden: int = 16, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](d, hidden)
        self.fc1.weight = PyroSample(_normal((hidden, d), dtype))
        self.fc1.bias = PyroSample(_normal((hidden,), dtype))
        self.fc2 = PyroModule[nn.Linear](hidden, 1)
        self.fc2.weight = PyroSample(_normal((1, hidden), dtype))
        self.fc2.bias = PyroSample(_normal((1,), dtype))
        self.dtype = dtype
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        for layer in (self.fc1, self.fc2):  # sample the weights here, outside the plate
            _ = layer.weight, layer.bias
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=self.dtype)))
        with pyro.plate("data", x.shape[0]) as idx:
            xb = x[idx]
            self.seen.append(tuple(xb.shape))
            mean = self.fc2(torch.tanh(self.fc1(xb))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, sigma), obs=None if y is None else y[idx])


def make_bnn_data(n: int = 40, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(n, d, generator=g, dtype=torch.float64)  # non-centred inputs
    y = torch.sin(x.sum(-1) / 3.0) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


class Recorder:
    """Linear regression that records the plate indices of every call (``self.calls``).

    With ``subsample_size`` the model subsamples its data plate itself.
    """

    def __init__(self, subsample_size: int | None = None) -> None:
        self.subsample_size = subsample_size
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        d = x.shape[-1]
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            self.calls.append(idx.clone())
            pyro.sample("y", dist.Normal(x[idx] @ w, s), obs=y[idx])


class Faulty:
    """``theta ~ N(loc, 1)`` plus a ``pyro.factor`` that breaks chosen model calls.

    Call ``k`` (0-based, counted in ``self.calls``; call 0 is the kernel's set-up trace, call 1
    the first gradient evaluation, call ``1 + t`` the evaluation after update ``t``) returns a
    NaN log density if ``k`` is in ``nan_lp_at`` or ``k >= nan_from``, and a finite log density
    with a NaN gradient if ``k`` is in ``nan_grad_at``.
    """

    def __init__(
        self,
        nan_lp_at: Collection[int] = (),
        nan_grad_at: Collection[int] = (),
        nan_from: float = math.inf,
    ) -> None:
        self.nan_lp_at = set(nan_lp_at)
        self.nan_grad_at = set(nan_grad_at)
        self.nan_from = nan_from
        self.calls = 0

    def __call__(self, loc: torch.Tensor) -> None:
        theta = pyro.sample("theta", dist.Normal(loc, 1.0).to_event(1))
        k = self.calls
        self.calls += 1
        if k in self.nan_lp_at or k >= self.nan_from:
            pyro.factor("fault", theta.sum() * math.nan)
        elif k in self.nan_grad_at:
            # value 0, gradient 0 / sqrt(negative) = NaN through the unused branch
            bad = torch.sqrt(-1.0 - theta.square()).sum()
            pyro.factor("fault", torch.where(torch.tensor(True), 0.0 * theta.sum(), bad))

"""PyroModule models for the BNP tests (importable by spawned processes)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class LinearRegression(PyroModule):
    """``y ~ N(x w + b, noise^2)``: one Linear layer whose input is the data itself."""

    def __init__(self, d: int, prior_scale: float = 10.0, noise: float = 1.0) -> None:
        super().__init__()
        self.noise = noise
        self.linear = PyroModule[nn.Linear](d, 1).double()
        self.linear.weight = PyroSample(
            dist.Normal(torch.tensor(0.0, dtype=torch.float64), prior_scale)
            .expand([1, d])
            .to_event(2)
        )
        self.linear.bias = PyroSample(
            dist.Normal(torch.tensor(0.0, dtype=torch.float64), prior_scale).expand([1]).to_event(1)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.linear.weight, self.linear.bias  # noqa: B018  (sample before the plate)
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.linear(x[idx]).squeeze(-1)
            pyro.sample("y", dist.Normal(mean, self.noise), obs=y[idx])


class LinearRegressionAndLocation(LinearRegression):
    """:class:`LinearRegression` plus a site outside the layer: ``loc ~ N(0, prior^2)`` with
    its own observations ``u ~ N(loc, u_noise^2)`` in the same data plate (independent of the
    layer, so its posterior is the conjugate Normal one)."""

    def __init__(
        self, d: int, prior_scale: float = 10.0, noise: float = 1.0, u_noise: float = 10.0
    ) -> None:
        super().__init__(d, prior_scale, noise)
        self.prior_scale = prior_scale
        self.u_noise = u_noise

    def forward(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> None:  # type: ignore[override]
        self.linear.weight, self.linear.bias  # noqa: B018  (sample before the plate)
        loc = pyro.sample(
            "loc", dist.Normal(torch.tensor(0.0, dtype=torch.float64), self.prior_scale)
        )
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.linear(x[idx]).squeeze(-1)
            pyro.sample("y", dist.Normal(mean, self.noise), obs=y[idx])
            pyro.sample("u", dist.Normal(loc, self.u_noise), obs=u[idx])

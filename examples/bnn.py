"""A small Bayesian neural network written as usual for Pyro, shared by the examples."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn


class BNN(PyroModule):
    """Regression MLP ``in -> hidden (tanh) -> 1`` with Gaussian priors and a HalfNormal noise.

    The pattern that matters for SGLD: the weights are sample sites of the network, sampled
    *before* the data plate is entered (here by touching them first), so that they are global
    latent variables and not one copy per mini-batch row.
    """

    def __init__(self, d_in: int = 1, hidden: int = 32, prior_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](d_in, hidden)
        self.fc1.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([hidden, d_in]).to_event(2)
        )
        self.fc1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([hidden]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](hidden, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([1, hidden]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Observe ``y`` (or predict it) given inputs ``x`` of shape ``[N, d_in]``."""
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
        # Sample the weights outside the plate; inside it the cached values are reused.
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, sigma), obs=None if y is None else y[idx])
        return mean


def make_data(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy ``sin`` curve with a gap, on a non-centred, badly scaled input axis."""
    g = torch.Generator().manual_seed(seed)
    u = torch.cat(
        [torch.rand(n // 2, generator=g) * 2 - 3, torch.rand(n - n // 2, generator=g) * 2 + 1]
    )
    x = (5.0 + 2.0 * u).unsqueeze(-1)  # non-centred, scaled inputs: BNP adapts to them
    y = torch.sin(u) + 0.1 * u + 0.15 * torch.randn(n, generator=g)
    return x, y

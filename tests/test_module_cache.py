"""The PyroModule cache fast path gives the log density and gradient of Pyro's general path.

For a ``PyroModule`` model the kernel hands ``PyroSample`` weights to the module through its
per-call cache and adds their log prior itself (closed form for fixed i.i.d. Normal priors).
Each test evaluates the same state both ways: with the fast path, and with it switched off
(``_module_sites = {}``, every site through Pyro's handlers and ``Distribution.log_prob``).
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from protocol_models import BNN, make_bnn_data
from pyro.nn import PyroModule, PyroSample
from seams import evaluate
from torch import nn

from pyro_bnp import SGLD

Params = dict[str, torch.Tensor]


class MixedPriors(PyroModule):
    """Sites of every kind: closed-form Normal (loc 0 and loc 1.5), a Laplace prior (log_prob in
    the graph), a prior that is a callable of the module, a weight inside a full-data plate,
    a positive PyroSample (a non-identity transform) and a plain ``pyro.sample`` site."""

    def __init__(self, d: int = 3, hidden: int = 5) -> None:
        super().__init__()
        f64 = torch.float64
        self.fc1 = PyroModule[nn.Linear](d, hidden).double()
        self.fc1.weight = PyroSample(
            dist.Normal(torch.tensor(0.0, dtype=f64), 0.8).expand([hidden, d]).to_event(2)
        )
        self.fc1.bias = PyroSample(
            dist.Normal(torch.tensor(1.5, dtype=f64), 2.0).expand([hidden]).to_event(1)
        )
        self.fc2 = PyroModule[nn.Linear](hidden, 1).double()
        self.fc2.weight = PyroSample(
            dist.Laplace(torch.tensor(0.0, dtype=f64), 1.0).expand([1, hidden]).to_event(2)
        )
        self.fc2.bias = PyroSample(
            lambda m: dist.Normal(m.weight.mean(), 1.0).expand([1]).to_event(1)
        )
        self.scale = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=f64), 0.5))
        self.shift = PyroSample(dist.Normal(torch.tensor(0.0, dtype=f64), 1.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        for layer in (self.fc1, self.fc2):
            _ = layer.weight, layer.bias
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
        scale = self.scale
        with pyro.plate("groups", 2):
            shift = self.shift  # inside a (full) plate: general path
        with pyro.plate("data", x.shape[0]) as idx:
            mean = scale * self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            mean = mean + shift.sum()
            pyro.sample("obs", dist.Normal(mean, sigma), obs=None if y is None else y[idx])


class CacheClearing(BNN):
    """Empties PyroModule's cache before touching the weights: the fast path must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.calls += 1
        if self.calls > 1:
            self._pyro_context.cache.clear()
        super().forward(x, y)


def _both_ways(kernel: SGLD, z: Params) -> tuple[tuple[float, Params], tuple[float, Params]]:
    """The potential on one mini-batch, with and without the PyroModule cache path."""
    pot, chain = kernel.potential, kernel.chain
    indices = pot.next_indices(chain.perms, chain.pos, chain.rng)
    fast = pot(z, indices, hooks=kernel.hooks)
    general = copy.copy(pot)
    general.disable_fast_path()
    slow = general(z, indices, hooks=kernel.hooks)
    assert pot.fast_sites and not general.fast_sites
    return fast, slow


def _perturbed(kernel: SGLD, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in kernel.initial_params.items()
    }


def test_which_sites_take_the_fast_path(seed):
    x, y = make_bnn_data(n=30)
    kernel = SGLD(MixedPriors(), 1e-4, preconditioner="identity")
    kernel.setup(0, x.double(), y.double())
    pot = kernel.potential
    assert pot.fast_sites == {"fc1.weight", "fc1.bias", "fc2.weight", "scale"}
    # closed form: the fixed i.i.d. Normal priors
    assert "fc1.weight" in pot.priors and "fc1.bias" in pot.priors
    assert pot.priors["fc1.bias"].loc == 1.5
    assert "fc2.weight" not in pot.priors  # Laplace: log_prob in the graph
    assert "scale" not in pot.priors  # LogNormal, positive: log_prob + log-det-Jacobian


@pytest.mark.parametrize("subsample", [None, {"data": 8}])
def test_fast_path_equals_general_path(seed, subsample):
    x, y = make_bnn_data(n=30)
    x, y = x.double(), y.double()
    kernel = SGLD(MixedPriors(), 1e-4, preconditioner="identity", subsample_size=subsample)
    kernel.setup(0, x, y)
    for i in range(3):
        z = _perturbed(kernel, seed + i)
        (lp_fast, g_fast), (lp_slow, g_slow) = _both_ways(kernel, z)
        assert lp_fast == pytest.approx(lp_slow, rel=1e-12, abs=1e-9)
        assert g_fast.keys() == g_slow.keys()
        for k in g_fast:
            assert torch.allclose(g_fast[k], g_slow[k], rtol=1e-10, atol=1e-10), k


def test_bnn_float32_with_bnp_hooks(seed):
    """The usual case: float32 BNN, BNP statistics hooks active, all weights closed form."""
    x, y = make_bnn_data(n=40)
    kernel = SGLD(BNN(dtype=torch.float32), 1e-4, subsample_size={"data": 10})
    kernel.setup(0, x.float(), y.float())
    assert kernel.potential.fast_sites == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    kernel.sample(kernel.initial_params)  # installs the hooks
    z = _perturbed(kernel, seed)
    (lp_fast, g_fast), (lp_slow, g_slow) = _both_ways(kernel, z)
    assert lp_fast == pytest.approx(lp_slow, rel=1e-5)
    for k in g_fast:
        assert torch.allclose(g_fast[k], g_slow[k], rtol=1e-4, atol=1e-4), k
    kernel.cleanup()


def test_prior_only_module(seed):
    """No likelihood at all: the closed-form priors alone make the log density."""

    class PriorOnly(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = PyroSample(dist.Normal(0.0, 2.0).expand([3]).to_event(1))

        def forward(self) -> None:
            _ = self.w

    kernel = SGLD(PriorOnly(), 1e-2, preconditioner="identity")
    kernel.setup(0)
    z = {"w": torch.tensor([1.0, -2.0, 0.5])}
    lp, grads = evaluate(kernel, z)
    expected = dist.Normal(0.0, 2.0).log_prob(z["w"]).sum()
    assert lp == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(grads["w"], z["w"] / 4.0)


def test_bypassed_cache_falls_back_to_the_general_path(seed):
    x, y = make_bnn_data(n=30)
    x, y = x.double(), y.double()
    model = CacheClearing()
    kernel = SGLD(model, 1e-4, preconditioner="bnp", subsample_size={"data": 10})
    kernel.setup(0, x, y)
    assert kernel.potential.fast_sites  # eligible at set-up (the first call did not clear)
    z = kernel.initial_params
    with pytest.warns(RuntimeWarning, match="did not come from the PyroModule cache"):
        kernel.sample(z)
    assert kernel.potential.fast_sites == set()
    # statistics: the initial evaluation's batch once (not the discarded run too), one update
    stats = [layer.stats.num_batches for layer in kernel.layers]
    assert stats == [2, 2]
    # and the evaluation equals a kernel that never had the fast path
    reference = SGLD(BNN(), 1e-4, preconditioner="identity", subsample_size={"data": 10})
    reference.setup(0, x, y)
    reference.potential.disable_fast_path()
    z1 = _perturbed(kernel, seed)
    indices = {"data": torch.randperm(30, generator=torch.Generator().manual_seed(1))[:10]}
    lp, g = kernel.potential(z1, indices, hooks=kernel.hooks)
    lp_ref, g_ref = reference.potential(z1, indices)
    assert lp == pytest.approx(lp_ref, rel=1e-12)
    for k in g:
        assert torch.allclose(g[k], g_ref[k], rtol=1e-12, atol=1e-12), k
    kernel.cleanup()


class SharedGradient(PyroModule):
    """``w1 + w2`` feeds the likelihood: autograd hands both the same gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        f64 = torch.float64
        self.w1 = PyroSample(dist.Normal(torch.tensor(0.0, dtype=f64), 1.0).expand([3]).to_event(1))
        self.w2 = PyroSample(dist.Normal(torch.tensor(0.0, dtype=f64), 2.0).expand([3]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        w = self.w1 + self.w2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)


def test_shared_gradient_tensors_are_not_updated_in_place(seed):
    x, y = make_bnn_data(n=20)
    x, y = x.double(), y.double()
    kernel = SGLD(SharedGradient(), 1e-4, preconditioner="identity")
    kernel.setup(0, x, y)
    assert kernel.potential.fast_sites == {"w1", "w2"}
    z = _perturbed(kernel, seed)
    (lp_fast, g_fast), (lp_slow, g_slow) = _both_ways(kernel, z)
    assert lp_fast == pytest.approx(lp_slow, rel=1e-12)
    for k in g_fast:
        assert torch.allclose(g_fast[k], g_slow[k], rtol=1e-12, atol=1e-12), k
    # the two gradients differ only by their priors: (w1 - 0) / 1 against (w2 - 0) / 4
    assert not torch.allclose(g_fast["w1"], g_fast["w2"])

"""The core's seams: one prior source for every model pattern, and a preconditioner added from
outside the package (docs/design.md, "How to add a preconditioner")."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from sgld_models import gaussian_target
from test_exact_posteriors import _check_variance_law, _run
from torch import Tensor, nn

from pyro_bnp import BNP, SGLD, Preconditioner
from pyro_bnp.integrators import sgld_step
from pyro_bnp.names import PRECONDITIONERS, make_preconditioner, register_preconditioner
from pyro_bnp.potential import MinibatchPotential


# -- a preconditioner written outside the package -------------------------------------------
class ConstantDiagonal(Preconditioner):
    """``M = c I``: only the two maps of the protocol, nothing fused."""

    name = "constant-diagonal"

    def __init__(self, c: float = 0.5) -> None:
        super().__init__()
        self.c = c

    def apply_at(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: g * math.sqrt(self.c) for k, g in grads.items()}

    def apply_a(self, u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: x.mul_(math.sqrt(self.c)) for k, x in u.items()}

    def config(self) -> dict[str, float]:
        return {"c": self.c}


@pytest.fixture
def registered():
    register_preconditioner("constant-diagonal", lambda: ConstantDiagonal(0.5))
    yield
    del PRECONDITIONERS["constant-diagonal"]


def test_external_preconditioner_has_the_exact_gaussian_law(seed, registered):
    """Registered by name, it runs the kernel's one update equation: the stationary variance of
    the chain on N(m, sigma^2) with full gradients and M = c is sigma^2 / (1 - eps c / (4
    sigma^2)) (docs/usage.md), distinguishable from sigma^2."""
    d, sigma, eps, c = 100, 1.5, 9.0, 0.5  # eps c / (4 sigma^2) = 0.5: variance doubles
    loc = torch.linspace(-3, 3, d, dtype=torch.float64)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="constant-diagonal")
    assert isinstance(kernel.preconditioner, ConstantDiagonal)
    mcmc = _run(kernel, loc, sigma, num_samples=3000, warmup_steps=200)
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    predicted = torch.full((d,), sigma**2 / (1 - eps * c / (4 * sigma**2)), dtype=torch.float64)
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


def test_external_preconditioner_drift_and_noise_agree(registered):
    pre = make_preconditioner("constant-diagonal")
    g = {"a": torch.randn(4, dtype=torch.float64)}
    assert torch.allclose(pre.drift(g)["a"], 0.5 * g["a"])
    assert torch.allclose(pre.noise(g)["a"], math.sqrt(0.5) * g["a"])
    # T = 0: the integrator's move is the preconditioned gradient step
    theta = {"a": torch.ones(4, dtype=torch.float64)}
    out = sgld_step(pre, theta, g, 0.1, temperature=0.0)
    assert torch.allclose(out["a"], theta["a"] - 0.05 * 0.5 * g["a"])
    assert torch.equal(theta["a"], torch.ones(4, dtype=torch.float64))  # inputs kept


def test_name_table_validation():
    with pytest.raises(ValueError, match="already registered"):
        register_preconditioner("bnp", BNP)
    with pytest.raises(ValueError, match="non-empty str"):
        register_preconditioner("", BNP)
    with pytest.raises(ValueError, match="preconditioner must be 'identity'.*got 'nope'"):
        make_preconditioner("nope")
    a, b = make_preconditioner("bnp+rmsprop"), make_preconditioner("bnp+rmsprop")
    assert a is not b and a.rmsprop is not b.rmsprop  # a fresh object per kernel


# -- one source of priors for every model pattern --------------------------------------------
PRIOR_SD = 0.05  # a stiff prior: at eps = 1e-2 plain BNP makes the prior alone unstable


class StiffNet(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = PyroModule[nn.Linear](3, 8)
        self.fc.weight = PyroSample(dist.Normal(0.0, PRIOR_SD).expand([8, 3]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, PRIOR_SD).expand([8]).to_event(1))
        self.out = PyroModule[nn.Linear](8, 1)
        self.out.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 8]).to_event(2))
        self.out.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: Tensor, y: Tensor | None = None) -> None:
        for layer in (self.fc, self.out):
            _ = layer.weight, layer.bias
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.out(torch.tanh(self.fc(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=None if y is None else y[idx])


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = 0.05 * torch.randn(64, 3, generator=g)  # low-variance inputs: BNP raises M there
    return x, torch.randn(64, generator=g)


def _kernels(pre_factory):
    net = StiffNet()

    def fn(x, y=None):
        net(x, y)

    return SGLD(net, 1e-2, preconditioner=pre_factory()), SGLD(
        fn, 1e-2, preconditioner=pre_factory(), modules=net
    )


def _first_draw(kernel: SGLD) -> tuple[list[str], dict[str, Tensor]]:
    x, y = _data()
    pyro.set_rng_seed(11)
    kernel.setup(0, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = kernel.sample(kernel.initial_params)
    return [str(w.message) for w in caught], z


def test_plain_function_with_modules_gets_the_same_priors_as_the_pyromodule(seed):
    as_module, as_function = _kernels(BNP)
    msgs_module, _ = _first_draw(as_module)
    msgs_function, _ = _first_draw(as_function)
    assert as_module.preconditioner.priors == as_function.preconditioner.priors
    assert as_module.preconditioner.priors["fc"] == pytest.approx((PRIOR_SD**2, PRIOR_SD**2))
    # the fast path is the PyroModule's only; the priors do not depend on it
    assert as_module.potential.fast_sites and not as_function.potential.fast_sites
    unstable = [m for m in msgs_module if "BNP layer 'fc'" in m]
    assert len(unstable) == 1 and "lambda_max(M Lambda_prior)" in unstable[0]
    assert [m for m in msgs_function if "BNP layer 'fc'" in m] == unstable


def test_prior_cap_acts_the_same_for_both_patterns(seed):
    as_module, as_function = _kernels(lambda: BNP(prior_cap=1.0))
    msgs_module, z_module = _first_draw(as_module)
    msgs_function, z_function = _first_draw(as_function)
    assert not [m for m in msgs_module + msgs_function if "BNP layer" in m]
    for pot in (as_module, as_function):
        nu = pot.preconditioner.prior_stability(1e-2, pot.preconditioner.priors)
        assert nu["fc"] <= 1.0 + 1e-9
    # the same chain: the two patterns differ only in how the log density is summed
    for k in z_module:
        torch.testing.assert_close(z_module[k], z_function[k], rtol=1e-5, atol=1e-6)


def test_potential_alone(seed):
    """The potential is usable without a kernel: a custom loop's log density and gradient."""
    x, y = _data()
    net = StiffNet()
    pot = MinibatchPotential(net, (x, y), subsample_size={"data": 16})
    assert pot.plates == {"data": (64, 16)} and pot.num_data == 64
    z = pot.initial_params
    lp, grads = pot(z, {"data": torch.arange(16)})
    assert math.isfinite(lp) and grads.keys() == z.keys()
    lp_all, _ = pot(z, {"data": torch.arange(64)})  # a different batch: a different estimate
    assert lp_all != lp


NUMERICS = ("preconditioners", "bnp", "names", "integrators", "chain", "schedules", "diagnostics")


@pytest.mark.parametrize("module", NUMERICS)
def test_numerics_never_import_pyro(module):
    """The numeric core is pure torch (docs/design.md): each module imports without Pyro."""
    root = Path(__file__).resolve().parents[1]
    code = f"""
import sys, types
pkg = types.ModuleType("pyro_bnp")
pkg.__path__ = [{str(root / "pyro_bnp")!r}]
sys.modules["pyro_bnp"] = pkg  # skip the package __init__ (it imports the Pyro glue)
import pyro_bnp.{module}
bad = sorted(m for m in sys.modules if m == "pyro" or m.startswith("pyro."))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

"""BNP's prior stability number ``nu = (eps/2) lambda_max(A^T Lambda A)``, kernel warning."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from test_bnp_algebra import CASES, _setup
from torch import nn

from pyro_bnp import BNP, SGLD, RMSprop


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("var_b", [1.0, 0.04, None])
def test_prior_stability_equals_dense_eigenvalue(case, var_b):
    """Against ``eigvalsh`` of ``Lambda^1/2 M Lambda^1/2`` for every neuron's dense block."""
    ref, params, _ = _setup(case)
    pre = BNP()
    pre.init(params, num_data=50.0, layers=(ref,))
    eps, var_w = 3e-3, 0.25
    nu = pre.prior_stability(eps, {"layer": (var_b, var_w)})["layer"]
    worst = 0.0
    for neuron in range(params["layer.weight"].shape[0]):
        m = pre.dense_matrix("layer", neuron).double()
        prec = torch.full((m.shape[0],), 1.0 / var_w, dtype=torch.float64)
        if ref.bias is not None:
            prec[0] = 1.0 / var_b if var_b is not None else 0.0
        root = prec.sqrt()
        worst = max(worst, float(torch.linalg.eigvalsh(root[:, None] * m * root[None, :]).max()))
    assert nu == pytest.approx(0.5 * eps * worst, rel=1e-9)


class _ConstantInputs(PyroModule):
    """One Linear layer fed nearly constant inputs: BNP's M is large, the prior stiff."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = PyroModule[nn.Linear](3, 1)
        self.fc.weight = PyroSample(dist.Normal(0.0, 0.1).expand([1, 3]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.fc.weight, self.fc.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            pyro.sample("y", dist.Normal(self.fc(x[idx]).squeeze(-1), 1.0), obs=y[idx])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 1.0 + 1e-3 * torch.randn(40, 3, generator=g)
    return x, torch.randn(40, generator=g)


def test_kernel_warns_once_when_the_prior_is_unstable(seed):
    x, y = _data()
    pre = BNP()
    kernel = SGLD(_ConstantInputs(), 1e-4, subsample_size={"data": 20}, preconditioner=pre)
    with pytest.warns(RuntimeWarning, match=r"BNP layer 'fc'.*> 2") as record:
        kernel.setup(0, x, y)
        z = kernel.initial_params
        for _ in range(3):
            z = kernel.sample(z)
    assert len([w for w in record if "BNP layer" in str(w.message)]) == 1
    nu = pre.prior_stability(1e-4, {"fc": (1.0, 0.01)})["fc"]
    assert nu > 2
    kernel.cleanup()


def test_no_warning_at_a_stable_step_size(seed):
    x, y = _data()
    pre = BNP()
    kernel = SGLD(_ConstantInputs(), 1e-9, subsample_size={"data": 20}, preconditioner=pre)
    kernel.setup(0, x, y)
    z = kernel.initial_params
    for _ in range(3):  # filterwarnings = error: any warning fails the test
        z = kernel.sample(z)
    assert pre.prior_stability(1e-9, {"fc": (1.0, 0.01)})["fc"] < 2
    kernel.cleanup()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_prior_cap_bounds_the_stability_number(case):
    """With ``prior_cap`` the exact ``nu`` is at most the cap; ``M`` stays ``P P^T / q^2``."""
    ref, params, _ = _setup(case)
    kappa, priors = 1.0, {"layer": (0.01, 1e-4)}
    plain = BNP()
    plain.init(params, num_data=50.0, layers=(ref,))
    eps = 10.0 * 3e-3 / plain.prior_stability(3e-3, priors)["layer"]  # nu is linear in eps
    assert plain.prior_stability(eps, priors)["layer"] == pytest.approx(10.0)  # uncapped
    pre = BNP(prior_cap=kappa)
    pre.init(params, num_data=50.0, layers=(ref,))
    pre.set_priors(priors)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    pre.update(grads, eps)  # the step size the cap is computed for
    nu = pre.prior_stability(eps, priors)["layer"]
    assert nu <= kappa * (1 + 1e-9)
    assert nu > 0.2 * kappa  # not shrunk needlessly: the bound is within 2x, the floor exact
    drift = pre.drift(grads)
    for neuron in range(params["layer.weight"].shape[0]):
        m = pre.dense_matrix("layer", neuron).double()
        g = grads["layer.weight"][neuron].reshape(-1)
        d = drift["layer.weight"][neuron].reshape(-1)
        if ref.bias is not None:
            g = torch.cat([grads["layer.bias"][neuron].reshape(1), g])
            d = torch.cat([drift["layer.bias"][neuron].reshape(1), d])
        assert torch.allclose(d, m @ g, rtol=1e-9, atol=1e-12)


def test_prior_cap_keeps_the_chain_stable(seed):
    x, y = _data()
    plain = SGLD(_ConstantInputs(), 1e-4, subsample_size={"data": 20}, preconditioner="bnp")
    plain.setup(0, x, y)
    with (
        pytest.warns(RuntimeWarning, match="BNP layer"),
        pytest.raises(RuntimeError, match="exploding"),
    ):
        z = plain.initial_params
        for _ in range(200):
            z = plain.sample(z)
    plain.cleanup()
    pre = BNP(prior_cap=1.0)
    kernel = SGLD(_ConstantInputs(), 1e-4, subsample_size={"data": 20}, preconditioner=pre)
    kernel.setup(0, x, y)
    z = kernel.initial_params
    for _ in range(200):  # no warning (filterwarnings = error), no explosion
        z = kernel.sample(z)
    assert max(float(v.abs().max()) for v in z.values()) < 10.0
    assert pre.prior_stability(1e-4, {"fc": (1.0, 0.01)})["fc"] <= 1.0 + 1e-9
    kernel.cleanup()


def test_prior_cap_changes_nothing_where_the_prior_is_soft(seed):
    """Prior sd 10 (the conjugate regression): the cap never engages, the draws are the same."""
    from bnp_models import LinearRegression
    from sgld_models import badly_scaled_features

    x, y = badly_scaled_features(200, scales=[0.3, 1.0, 3.0], means=[1.0, -2.0, 3.0])
    chains = []
    for pre in (BNP(), BNP(prior_cap=1.0)):
        pyro.set_rng_seed(seed)
        kernel = SGLD(LinearRegression(3), 1e-4, subsample_size={"data": 20}, preconditioner=pre)
        kernel.setup(0, x, y)
        z = kernel.initial_params
        for _ in range(50):
            z = kernel.sample(z)
        chains.append(z)
        kernel.cleanup()
    for k in chains[0]:
        assert torch.equal(chains[0][k], chains[1][k]), k


def test_prior_cap_validation():
    with pytest.raises(ValueError, match="prior_cap"):
        BNP(prior_cap=2.5)
    with pytest.raises(ValueError, match="prior_cap"):
        BNP(prior_cap=True)
    with pytest.raises(ValueError, match="plain BNP only"):
        BNP(prior_cap=1.0, rmsprop=RMSprop())

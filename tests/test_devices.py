"""Device-correctness: every piece of a chain lives on the parameters' device (CPU always, CUDA
when present), in float32 and float64, for every preconditioner and both samplers, eager and
compiled. See docs/usage.md, "Devices".

Chains are compared bit for bit only along one code path on one device (a resumed chain against
an uninterrupted one); eager against compiled within float tolerance, as in test_compiled.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import max_rel
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from sgld_models import badly_scaled_features, gaussian_target, linreg
from test_exact_posteriors import _check_variance_law
from torch import nn

from pyro_bnp import BNP, SGHMC, SGLD, RMSprop

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
DTYPES = [torch.float32, torch.float64]


class MLP(PyroModule):
    """``y ~ N(f(x), 0.5^2)`` with a 3-8-1 tanh network, N(0, 1) priors made on ``device``.

    ``latent_noise``: the noise scale is a site outside the layers, ``sigma ~ HalfNormal(1)``.
    """

    def __init__(
        self, device: str, dtype: torch.dtype, d: int = 3, h: int = 8, latent_noise: bool = False
    ) -> None:
        super().__init__()
        self.latent_noise = latent_noise
        zero = torch.zeros((), device=device, dtype=dtype)
        self.one = zero + 1.0
        self.l1 = PyroModule[nn.Linear](d, h).to(device, dtype)
        self.l2 = PyroModule[nn.Linear](h, 1).to(device, dtype)
        for layer, (fan_out, fan_in) in ((self.l1, (h, d)), (self.l2, (1, h))):
            layer.weight = PyroSample(dist.Normal(zero, 1.0).expand([fan_out, fan_in]).to_event(2))
            layer.bias = PyroSample(dist.Normal(zero, 1.0).expand([fan_out]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias  # noqa: B018
        sigma = pyro.sample("sigma", dist.HalfNormal(self.one)) if self.latent_noise else 0.5
        with pyro.plate("data", x.shape[0]) as idx:
            out = self.l2(torch.tanh(self.l1(x[idx]))).squeeze(-1)
            pyro.sample("y", dist.Normal(out, sigma), obs=y[idx])


def _data(device, dtype, n=400):
    x, y = badly_scaled_features(n, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    return x.to(device, dtype), y.to(device, dtype)


def _run(kernel, *args, num_samples=30, warmup_steps=10, seed=3):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run(*args)
    return mcmc


def _tensors(obj, path=""):
    """Every tensor in a nested state (the generator's byte state excepted: always on the CPU)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if "rng" not in str(k):
                yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _assert_on(kernel, device, dtype):
    chain = kernel.chain
    assert chain.rng.device.type == device
    state = kernel.state_dict()
    found = list(_tensors(state))
    assert any(p.startswith("/z/") for p, _ in found), sorted(p for p, _ in found)
    for p, t in found:
        assert t.device.type == device, f"{p} is on {t.device}, expected {device}"
        if t.is_floating_point():
            assert t.dtype == dtype, f"{p} is {t.dtype}, expected {dtype}"


def _preconditioner(name):
    return {
        "identity": lambda: "identity",
        "rmsprop": lambda: RMSprop(),
        "bnp": lambda: BNP(),
        "bnp+rmsprop": lambda: BNP(rmsprop=RMSprop()),
    }[name]()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("sampler", [SGLD, SGHMC], ids=["sgld", "sghmc"])
@pytest.mark.parametrize("pre", ["identity", "rmsprop", "bnp", "bnp+rmsprop"])
def test_chain_lives_on_the_device(device, dtype, sampler, pre):
    """Position, gradient, momentum, preconditioner state (RMSprop's V, BNP's layer statistics)
    and the generator are on the data's device, in its dtype; the draws are finite."""
    x, y = _data(device, dtype)
    extra = {"friction": 5.0} if sampler is SGHMC else {}
    kernel = sampler(MLP(device, dtype), 1e-4, subsample_size={"data": 40},
                     preconditioner=_preconditioner(pre), **extra)  # fmt: skip
    mcmc = _run(kernel, x, y)
    for name, v in mcmc.get_samples().items():
        assert v.device.type == device, name
        assert torch.isfinite(v).all(), name
    _assert_on(kernel, device, dtype)
    if sampler is SGHMC:
        assert kernel.chain.aux["momentum"], "SGHMC keeps a momentum per site"
    assert not kernel.diagnostics()["divergences"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", [SGLD, SGHMC], ids=["sgld", "sghmc"])
@pytest.mark.parametrize("freeze", [False, True], ids=["running", "frozen"])
def test_resume_on_the_device_equals_an_uninterrupted_chain(device, sampler, freeze):
    """Bit for bit on one device: the generator state and the permutation travel with it; a
    BNP frozen after warmup continues with the same M (derived from the frozen statistics)."""
    x, y = _data(device, torch.float32)
    extra = {"friction": 5.0} if sampler is SGHMC else {}
    warm = 10 if freeze else 0

    def kernel():
        pre = BNP(rmsprop=RMSprop(), freeze_after_warmup=freeze)
        return sampler(MLP(device, torch.float32), 1e-4, subsample_size={"data": 40},
                       preconditioner=pre, **extra)  # fmt: skip

    full = _run(kernel(), x, y, num_samples=40, warmup_steps=warm).get_samples()
    first = kernel()
    head = _run(first, x, y, num_samples=20, warmup_steps=warm).get_samples()
    second = kernel()
    second.load_state_dict(first.state_dict())
    tail = _run(second, x, y, num_samples=20, warmup_steps=0, seed=99).get_samples()
    for k in full:
        assert torch.equal(torch.cat([head[k], tail[k]]), full[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checks", ["host", "device"])
@pytest.mark.parametrize("pre", ["identity", "rmsprop"])
def test_traced_update_follows_the_eager_chain_on_the_device(device, checks, pre):
    """``compile="trace"`` (the traced graph, no inductor) on the device: 300 updates within
    float32 rounding of the eager chain, in either guard mode."""
    x, y = _data(device, torch.float32)
    runs = []
    for comp in (False, "trace"):
        k = SGLD(linreg, 1e-4, subsample_size={"data": 40}, preconditioner=pre, compile=comp,
                 compile_options={"checks": checks} if comp else None)  # fmt: skip
        runs.append(_run(k, x, y, num_samples=300, warmup_steps=0).get_samples())
        if comp:
            assert k._compiled is not None and k._compiled.verified
            assert k._compiled.host_checks == (checks == "host")
            _assert_on(k, device, torch.float32)
    eager, traced = runs
    assert max_rel(traced, eager) < 1e-4, max_rel(traced, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("comp", [False, "trace"], ids=["eager", "traced"])
def test_gaussian_variance_law_on_the_device(device, comp, seed):
    """The exact stationary variance of the discretisation (docs/usage.md) holds on the device:
    ``sigma^2 / (1 - eps / (4 sigma^2))`` per coordinate, for a Gaussian target."""
    d, sigma, eps = 100, 1.5, 4.5
    loc = torch.linspace(-3, 3, d, dtype=torch.float64, device=device)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity", compile=comp)
    mcmc = _run(kernel, loc, sigma, num_samples=3000, warmup_steps=200, seed=seed)
    draws = mcmc.get_samples(group_by_chain=True)["theta"].cpu()
    predicted = torch.full((d,), sigma**2 / (1 - eps / (4 * sigma**2)), dtype=torch.float64)
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_arviz_export_from_the_device(device):
    """``from_pyro`` moves the draws to host memory; the values are the chain's."""
    from pyro_bnp import from_pyro

    x, y = _data(device, torch.float32)
    kernel = SGLD(linreg, 1e-4, subsample_size={"data": 40}, preconditioner="identity")
    mcmc = _run(kernel, x, y, num_samples=20)
    idata = from_pyro(mcmc, log_likelihood=False)
    w = mcmc.get_samples()["w"].cpu().numpy()
    assert (idata.posterior["w"].values[0] == w).all()


# -- CUDA only: inductor on the GPU (on the CPU, tests/test_compiled.py covers it) ------------
INDUCTOR_DEVICES = [d for d in DEVICES if not isinstance(d, str)]  # the CUDA param only


@pytest.mark.parametrize("device", INDUCTOR_DEVICES)
@pytest.mark.parametrize("sampler", [SGLD, SGHMC], ids=["sgld", "sghmc"])
@pytest.mark.parametrize("pre", ["identity", "rmsprop", "bnp", "bnp+rmsprop"])
def test_inductor_update_follows_the_eager_chain(device, sampler, pre):
    """``compile=True`` on the GPU (device guards by default): 300 updates within float32
    rounding of the eager chain; BNP's layer statistics too, and on the device."""
    x, y = _data(device, torch.float32)
    extra = {"friction": 5.0, "health": None} if sampler is SGHMC else {}
    step = 1e-4 if sampler is SGLD else 1e-3
    runs = []
    for comp in (False, True):
        model = MLP(device, torch.float32) if "bnp" in pre else linreg
        k = sampler(model, step, subsample_size={"data": 40},
                    preconditioner=_preconditioner(pre), compile=comp, **extra)  # fmt: skip
        runs.append(_run(k, x, y, num_samples=300, warmup_steps=0).get_samples())
        if comp:
            assert k._compiled is not None and k._compiled.verified
            assert k._compiled.host_checks == (device == "cpu")
            _assert_on(k, device, torch.float32)
    eager, compiled = runs
    assert max_rel(compiled, eager) < 1e-4, max_rel(compiled, eager)

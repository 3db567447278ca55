"""The kernel reduces to plain SGLD, and at T = 0 to a preconditioned gradient step.

Bit-for-bit reference: ``z <- z - eps/2 grad U(z) + sqrt(eps) xi`` with ``xi`` drawn site by
site in sorted name order from a ``torch.Generator`` seeded with the chain's seed. The
arithmetic must be mirrored to get the same bits, as docs/design.md says of every bit-for-bit
test (same code path only): the integrator writes the update as ``z + s (xi - k g)`` with
``s = sqrt(eps)``, ``k = (eps/2) / s``, i.e. ``u = torch.sub(xi, g, alpha=k)`` and
``torch.add(z, u, alpha=s)`` (fused multiply-adds where the CPU has them). The reference uses the
same calls; the literal formula is checked to agree to a few ulps. The gradient: the
reference computes ``grad U`` with autograd on its own hand-written log density, summed in a
different order from the kernel's messenger, with the kernel's one-pass Normal log density
(see ``normal_log_prob_sum``), and the bits agree.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from protocol_models import BNN, make_bnn_data
from pyro.infer import MCMC
from sgld_models import gaussian_target, linreg, make_linreg_data

from pyro_bnp import SGLD
from pyro_bnp.potential import _iid_normal_log_prob_sum


def normal_log_prob_sum(fn: dist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value).sum()`` for a Normal, in the kernel's own arithmetic.

    The kernel sums Normal log densities with one difference and one dot product (checked
    against ``Distribution.log_prob`` in test_fast_paths.py); the reference uses the same
    arithmetic so that the gradient bits agree.
    """
    out = _iid_normal_log_prob_sum(fn, value)
    assert out is not None
    return out


Params = dict[str, torch.Tensor]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_linreg_data(n=60, d=3, seed=1)
    return x.double(), y.double()


def linreg_grad_u(z: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """``grad U`` of :func:`sgld_models.linreg` on the unconstrained space, by hand."""
    w, b, zs = (z[k].detach().requires_grad_() for k in ("w", "b", "s"))
    s = torch.exp(zs)
    one = torch.tensor(1.0, dtype=x.dtype)
    log_joint = (
        zs  # log |d exp(zs) / d zs|
        + normal_log_prob_sum(dist.Normal(x @ w + b, s), y)
        + normal_log_prob_sum(dist.Normal(torch.zeros_like(w), one).to_event(1), w)
        + normal_log_prob_sum(dist.Normal(0.0 * one, one), b)
        + dist.HalfNormal(one).log_prob(s)
    )
    gw, gb, gs = torch.autograd.grad(-log_joint, [w, b, zs])
    return {"w": gw, "b": gb, "s": gs}


def gaussian_grad_u(z: Params, loc: torch.Tensor, scale: float) -> Params:
    theta = z["theta"].detach().requires_grad_()
    (g,) = torch.autograd.grad(
        -normal_log_prob_sum(dist.Normal(loc, scale).to_event(1), theta), [theta]
    )
    return {"theta": g}


def plain_sgld(z0: Params, grad_u, eps: float, seed: int, num_steps: int, fused: bool = True):
    """The reference loop; returns the list of states after each update."""
    g = torch.Generator().manual_seed(seed)
    z = {k: v.clone() for k, v in z0.items()}
    out = []
    for _ in range(num_steps):
        grad = grad_u(z)
        new = {}
        for k in sorted(z):
            xi = torch.randn(z[k].shape, generator=g, dtype=z[k].dtype)
            if fused:
                s = math.sqrt(eps)
                u = torch.sub(xi, grad[k], alpha=(eps / 2) / s)
                new[k] = torch.add(z[k], u, alpha=s)
            else:
                new[k] = z[k] - eps / 2 * grad[k] + math.sqrt(eps) * xi
        z = new
        out.append(z)
    return out


def _assert_bitwise(a: Params, b: Params, where: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float64
        assert torch.equal(a[k], b[k]), f"{where}, site {k}: max diff {(a[k] - b[k]).abs().max()}"


@pytest.mark.parametrize("target", ["linreg", "gaussian"])
def test_identity_is_plain_sgld_bit_for_bit(seed, target):
    eps, num_steps = 2e-3, 200
    if target == "linreg":
        x, y = _data()
        args: tuple = (x, y)
        kernel = SGLD(linreg, step_size=eps, preconditioner="identity")

        def grad_u(z):
            return linreg_grad_u(z, x, y)
    else:
        loc, scale = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64), 0.7
        args = (loc, scale)
        kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity")

        def grad_u(z):
            return gaussian_grad_u(z, loc, scale)

    kernel.setup(0, *args)
    z0 = {k: v.clone() for k, v in kernel.initial_params.items()}
    chain_seed = kernel.diagnostics()["rng_seed"]
    reference = plain_sgld(z0, grad_u, eps, chain_seed, num_steps)
    z = z0
    for t in range(num_steps):
        z = kernel.sample(z)
        _assert_bitwise(z, reference[t], f"update {t + 1}")
    # the literal two-rounding formula drifts from the fused one by rounding only
    literal = plain_sgld(z0, grad_u, eps, chain_seed, num_steps, fused=False)[-1]
    for k in z:
        assert torch.allclose(literal[k], z[k], rtol=0.0, atol=1e-13), k
    print(f"{target}: {num_steps} updates bit-identical, seed {chain_seed}")


def test_identity_through_mcmc_with_thin_is_plain_sgld(seed):
    """Same, through ``pyro.infer.MCMC`` (warmup, thinning, constrained output)."""
    eps, warmup, num_samples, thin = 2e-3, 5, 10, 3
    x, y = _data()
    kernel = SGLD(linreg, step_size=eps, preconditioner="identity", thin=thin)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    z0 = kernel.initial_params
    reference = plain_sgld(
        z0,
        lambda z: linreg_grad_u(z, x, y),
        eps,
        kernel.diagnostics()["rng_seed"],
        (warmup + num_samples) * thin,
    )
    for i in range(num_samples):
        ref = reference[(warmup + i + 1) * thin - 1]
        assert torch.equal(samples["w"][i], ref["w"])
        assert torch.equal(samples["b"][i], ref["b"])
        assert torch.equal(samples["s"][i], torch.exp(ref["s"]))  # constrained


# -- temperature 0: the deterministic step z - eps/2 M g ------------------------------------
def _one_cold_step(kernel: SGLD, *args) -> tuple[Params, Params]:
    kernel.setup(0, *args)
    z0 = {k: v.clone() for k, v in kernel.initial_params.items()}
    assert kernel.chain is not None
    rng_before = kernel.chain.rng.get_state()
    z1 = kernel.sample(z0)
    assert torch.equal(kernel.chain.rng.get_state(), rng_before), "T = 0 must draw no noise"
    return z0, z1


@pytest.mark.parametrize("preconditioner", ["identity", "rmsprop"])
def test_zero_temperature_is_gradient_step(seed, preconditioner):
    eps = 1e-3
    x, y = _data()
    kernel = SGLD(linreg, step_size=eps, preconditioner=preconditioner, temperature=0.0)
    z0, z1 = _one_cold_step(kernel, x, y)
    g = linreg_grad_u(z0, x, y)
    n = x.shape[0]
    for k in z0:
        if preconditioner == "identity":  # the integrator's T = 0 arithmetic: z + (0 - eps/2 g)
            step = torch.zeros_like(g[k]).sub_(g[k], alpha=eps / 2)
            assert torch.equal(z1[k], torch.add(z0[k], step)), k
        else:  # fresh RMSprop: V = (g / N)^2, M = 1 / (sqrt(V) + 1e-5)
            m = 1.0 / ((g[k] / n).abs() + 1e-5)
            torch.testing.assert_close(z1[k], z0[k] - eps / 2 * m * g[k], rtol=1e-13, atol=0.0)


def _bnn_grad_u(z: Params, net_x: torch.Tensor, y: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """Hand-written ``grad U`` of :class:`protocol_models.BNN`, and the hidden layer input."""
    leaves = {k: v.detach().requires_grad_() for k, v in z.items()}
    w1, b1, w2, b2 = (leaves[k] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    sigma = torch.exp(leaves["sigma"])
    h = torch.tanh(net_x @ w1.T + b1)
    mean = (h @ w2.T + b2).squeeze(-1)
    one = torch.tensor(1.0, dtype=torch.float64)
    lj = dist.Normal(mean, sigma).log_prob(y).sum() + leaves["sigma"]
    lj = lj + dist.HalfNormal(one).log_prob(sigma)
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        lj = lj + dist.Normal(0.0 * one, one).log_prob(leaves[k]).sum()
    names = list(leaves)
    grads = torch.autograd.grad(-lj, [leaves[k] for k in names])
    return dict(zip(names, grads, strict=True)), h.detach()


def _bnp_matrix(inputs: torch.Tensor, eps1: float = 1e-2, eps2: float = 1e-4):
    """``P`` and ``q`` of one dense layer from its full-batch input (the paper's formulas)."""
    n, fan_in = inputs.shape
    mu = inputs.mean(0)
    var = inputs.var(0, correction=0)
    s = torch.sqrt(var + eps1 * var.max() + eps2)
    p = torch.zeros(fan_in + 1, fan_in + 1, dtype=torch.float64)
    p[0, 0] = 1.0
    p[0, 1:] = -mu / s
    p[1:, 1:] = torch.diag(1.0 / s)
    q = math.sqrt(max(fan_in / n, 1.0))
    return p, q


@pytest.mark.parametrize("preconditioner", ["bnp", "bnp+rmsprop"])
def test_zero_temperature_bnp_step_on_pyro_module(seed, preconditioner):
    """One cold BNP step on a 3-16-1 BNN equals ``z - eps/2 M g`` with explicit ``M``.

    ``N = 10`` rows, so the hidden layer's block-balancing factor ``q^2 = 16 / 10`` is active.
    """
    eps = 1e-3
    x, y = make_bnn_data(n=10)
    net = BNN()
    kernel = SGLD(net, step_size=eps, preconditioner=preconditioner, temperature=0.0)
    z0, z1 = _one_cold_step(kernel, x, y)
    assert {ref.name for ref in kernel.layers} == {"fc1", "fc2"}
    g, h = _bnn_grad_u(z0, x, y)
    n = x.shape[0]
    rms = preconditioner == "bnp+rmsprop"
    expected = {}
    for layer, inputs in (("fc1", x), ("fc2", h)):
        p, q = _bnp_matrix(inputs)
        wk, bk = f"{layer}.weight", f"{layer}.bias"
        for i in range(g[wk].shape[0]):  # one block [b_i; w_i] per output neuron
            gi = torch.cat([g[bk][i].reshape(1), g[wk][i]])
            if rms:  # fresh RMSprop in BNP coordinates: g_z = P^T g / q, V = (g_z / N)^2
                gz = p.T @ gi / q
                m = (p * (1.0 / ((gz / n).abs() + 1e-5))) @ p.T / q**2
            else:
                m = p @ p.T / q**2
            step = m @ gi
            expected.setdefault(bk, z0[bk].clone())[i] -= eps / 2 * step[0]
            expected.setdefault(wk, z0[wk].clone())[i] -= eps / 2 * step[1:]
    if rms:  # the noise scale is plain RMSprop
        expected["sigma"] = z0["sigma"] - eps / 2 * g["sigma"] / ((g["sigma"] / n).abs() + 1e-5)
    else:  # ... or the identity
        expected["sigma"] = z0["sigma"] - eps / 2 * g["sigma"]
    assert z1.keys() == expected.keys()
    for k in z1:
        torch.testing.assert_close(z1[k], expected[k], rtol=1e-12, atol=1e-14, msg=k)
        assert not torch.equal(z1[k], z0[k]), k

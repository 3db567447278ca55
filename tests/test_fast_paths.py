"""Fast paths of the kernel's log joint give the same values and gradients as Pyro's."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_bnp.potential import _iid_normal_log_prob_sum


@pytest.mark.parametrize("loc", [0.0, 1.5])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 3)])
def test_iid_normal_matches_log_prob(loc, shape):
    torch.manual_seed(0)
    value = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fn = dist.Normal(torch.tensor(loc, dtype=torch.float64), scale).expand(shape)
    fn = fn.to_event(len(shape))
    fast = _iid_normal_log_prob_sum(fn, value)
    assert fast is not None
    slow = fn.log_prob(value).sum()
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast, [value, scale])
    g_slow = torch.autograd.grad(slow, [value, scale])
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("constant_scale", [False, True])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_normal_likelihood_with_one_scale_matches_log_prob(scale_shape, constant_scale):
    """A Gaussian likelihood: ``loc`` per row, one (fixed or latent) noise scale broadcast."""
    torch.manual_seed(1)
    value = torch.randn(11, dtype=torch.float64)
    loc = torch.randn(11, dtype=torch.float64, requires_grad=True)
    scale = torch.full(scale_shape, 0.3, dtype=torch.float64)
    scale.requires_grad_(not constant_scale)
    fn = dist.Normal(loc, scale)
    fast = _iid_normal_log_prob_sum(fn, value, factor=2.5)  # e.g. a plate's N / B
    assert fast is not None
    slow = 2.5 * fn.log_prob(value).sum()
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    inputs = [loc] if constant_scale else [loc, scale]
    g_fast = torch.autograd.grad(fast, inputs)
    g_slow = torch.autograd.grad(slow, inputs)
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_iid_normal_declines_other_distributions():
    value = torch.randn(3, 4)
    assert _iid_normal_log_prob_sum(dist.Normal(0.0, torch.rand(3, 4)).to_event(2), value) is None
    assert (
        _iid_normal_log_prob_sum(dist.Laplace(0.0, 1.0).expand([3, 4]).to_event(2), value) is None
    )
    assert _iid_normal_log_prob_sum(dist.Normal(0.0, 1.0).expand([4]), value) is None  # broadcast

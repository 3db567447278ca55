"""Kernel Stein discrepancy (pyro_bnp.diagnostics.ksd): the formula, the Monte Carlo rate, bias."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_bnp.diagnostics import ksd

F64 = torch.float64

# a correlated 3-d Gaussian target N(M, S), S = L L^T
M = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.6]], dtype=F64)
S = L @ L.T
P = torch.linalg.inv(S)


def gaussian_draws(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + torch.randn(n, 3, generator=g, dtype=F64) @ L.T


def score(x: torch.Tensor) -> torch.Tensor:
    """grad log N(x; M, S) = -S^{-1} (x - M)."""
    return -(x - M) @ P


def imq(x: torch.Tensor, y: torch.Tensor, c: float, beta: float) -> torch.Tensor:
    return (c**2 + ((x - y) ** 2).sum()) ** beta


def ksd_autograd(x: torch.Tensor, s: torch.Tensor, c: float = 1.0, beta: float = -0.5) -> float:
    """sqrt(1/n^2 sum_ab k_p(x_a, x_b)), every kernel derivative by autograd, pair by pair."""
    n, d = x.shape
    total = 0.0
    for a in range(n):
        for b in range(n):
            xa = x[a].clone().requires_grad_()
            xb = x[b].clone().requires_grad_()
            k = imq(xa, xb, c, beta)
            gx, gy = torch.autograd.grad(k, (xa, xb), create_graph=True)
            # trace of the mixed Hessian: sum_i d^2 k / (dx_i dy_i)
            trace = sum(torch.autograd.grad(gx[i], xb, retain_graph=True)[0][i] for i in range(d))
            total += float(
                (s[a] @ s[b]) * k.detach() + s[a] @ gy.detach() + s[b] @ gx.detach() + trace
            )
    return math.sqrt(total / n**2)


def ksd_broadcast(x: torch.Tensor, s: torch.Tensor, c: float, beta: float) -> float:
    """The same V-statistic from the closed-form IMQ Stein kernel, all pairs at once."""
    n, d = x.shape
    r = x[:, None, :] - x[None, :, :]  # r_ab = x_a - x_b
    q = (r**2).sum(-1)
    u = c**2 + q
    kp = (
        u**beta * (s @ s.T)
        + 2 * beta * u ** (beta - 1) * ((s[None, :, :] - s[:, None, :]) * r).sum(-1)
        - 2 * beta * d * u ** (beta - 1)
        - 4 * beta * (beta - 1) * q * u ** (beta - 2)
    )
    return math.sqrt(float(kp.mean()))


# --------------------------------------------------------------------------- the formula
def test_matches_pairwise_autograd_evaluation():
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(12, 3, generator=g, dtype=F64) + 5.0
    s = torch.randn(12, 3, generator=g, dtype=F64)  # any vectors: the formula is not Gaussian
    assert ksd(x, s) == pytest.approx(ksd_autograd(x, s), rel=1e-10, abs=1e-12)
    assert ksd(x, s, c=0.3, beta=-0.8) == pytest.approx(
        ksd_autograd(x, s, c=0.3, beta=-0.8), rel=1e-10, abs=1e-12
    )


@pytest.mark.parametrize(("c", "beta"), [(1.0, -0.5), (2.5, -0.2), (0.1, -0.9)])
def test_matches_broadcast_closed_form(c, beta):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 4, generator=g, dtype=F64) * torch.tensor([0.1, 1.0, 3.0, 10.0])
    s = -x + 0.5 * torch.randn(150, 4, generator=g, dtype=F64)
    assert ksd(x, s, c=c, beta=beta) == pytest.approx(
        ksd_broadcast(x, s, c, beta), rel=1e-10, abs=1e-12
    )


def test_blockwise_equals_one_block_and_thin_works():
    x = gaussian_draws(500, seed=3)
    s = score(x)
    one = ksd(x, s, block_size=10_000)
    for block in (7, 64, 499, 500):
        assert ksd(x, s, block_size=block) == pytest.approx(one, rel=1e-12)
    assert ksd(x[:40], s[:40], block_size=1) == pytest.approx(ksd(x[:40], s[:40]), rel=1e-12)
    assert ksd(x, s, thin=3) == ksd(x[::3], s[::3])
    assert ksd(x, s, thin=3) != one


def test_translation_invariant_and_float32_accumulates_in_float64():
    x = gaussian_draws(300, seed=4)
    s = score(x)
    # the target moved with the draws: the Stein kernel depends on differences only
    assert ksd(x + 1e4, s) == pytest.approx(ksd(x, s), rel=1e-9)
    x32, s32 = x.float(), s.float()
    assert ksd(x32, s32) == pytest.approx(ksd(x32.double(), s32.double()), rel=1e-12)


def test_one_dimensional_input_and_non_finite():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, generator=g, dtype=F64)
    assert ksd(x, -x) == ksd(x[:, None], -x[:, None])
    bad = x.clone()
    bad[7] = math.nan
    assert ksd(bad, -x) == math.inf
    s = -x.clone()
    s[3] = math.inf
    assert ksd(x, s) == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [{"c": 0.0}, {"c": -1.0}, {"beta": 0.0}, {"beta": -1.0}, {"beta": 0.5}, {"thin": 0}],
)
def test_invalid_arguments(kwargs):
    x = gaussian_draws(10, seed=0)
    with pytest.raises(ValueError):
        ksd(x, score(x), **kwargs)


def test_invalid_shapes_and_block_size():
    x = gaussian_draws(10, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        ksd(x, score(x)[:, :2])
    with pytest.raises(ValueError, match="block_size"):
        ksd(x, score(x), block_size=0)
    with pytest.raises(ValueError, match="thin"):
        ksd(x, score(x), thin=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one row"):
        ksd(x[:0], score(x)[:0])


# --------------------------------------------------------------------------- statistics
# For exact draws, E[KSD^2] = E[k_p(x, x)] / n exactly (E k_p(x, y) = 0 for independent x, y ~ p),
# and for N(M, S) with c = 1, beta = -1/2: E k_p(x, x) = tr(S^-1) + d.
EXPECTED_NK2 = float(torch.trace(P)) + 3  # 9.406


def test_exact_draws_fall_at_the_monte_carlo_rate():
    """n KSD^2 has the same mean at n = 250 and n = 4000: KSD(250) / KSD(4000) ~ sqrt(16) = 4.

    Tolerances from the spread of n KSD^2 over seeds (pilot: 200 seeds at n = 250, 30 at 4000):
    its sd is 3.9 at n = 250 and 3.0 at n = 4000 (a weighted chi-square, skewed to the right).
    With 100 and 10 seeds the means have standard errors 0.39 (4%) and 0.95 (10%); the
    root-mean-square ratio sqrt(mean KSD^2(250) / mean KSD^2(4000)) then has a relative standard
    error of about 5.5%. We allow 4.5 standard errors: 25% on the ratio, 45% / 20% on the means.
    """
    nk2_small = torch.tensor(
        [250 * ksd(x, score(x)) ** 2 for x in (gaussian_draws(250, s) for s in range(100))]
    )
    nk2_large = torch.tensor(
        [4000 * ksd(x, score(x)) ** 2 for x in (gaussian_draws(4000, s) for s in range(10))]
    )
    assert nk2_small.mean() == pytest.approx(EXPECTED_NK2, rel=0.20)
    assert nk2_large.mean() == pytest.approx(EXPECTED_NK2, rel=0.45)
    ratio = math.sqrt((nk2_small.mean() / 250) / (nk2_large.mean() / 4000))
    assert ratio == pytest.approx(4.0, rel=0.25)


def test_biased_draws_give_a_clearly_larger_ksd():
    """A mean shifted by half a marginal sd, or the spread scaled by 1.5 or 0.8, at n = 1000.

    Exact draws give KSD ~ sqrt(9.4 / 1000) ~ 0.1 (0.072-0.096 for these seeds); the biased
    draws give 1.07-1.11, 0.40-0.43 and 0.236-0.249: at least 2.4 times the exact value.
    """
    sd = S.diagonal().sqrt()
    for seed in range(3):
        x = gaussian_draws(1000, seed)
        exact = ksd(x, score(x))
        assert exact < 0.12
        for biased in (x + 0.5 * sd, M + 1.5 * (x - M), M + 0.8 * (x - M)):
            assert ksd(biased, score(biased)) > 2 * exact


def test_module_imports_without_pyro():
    root = Path(__file__).resolve().parents[1]
    code = f"""
import sys, types
pkg = types.ModuleType("pyro_bnp")
pkg.__path__ = [{str(root / "pyro_bnp")!r}]
sys.modules["pyro_bnp"] = pkg
from pyro_bnp.diagnostics import ksd
import torch
x = torch.randn(20, 2)
assert ksd(x, -x) > 0
bad = sorted(m for m in sys.modules if m == "pyro" or m.startswith("pyro."))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

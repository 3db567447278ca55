"""The mini-batch log joint and its gradient are unbiased estimates of the full-data values.

The full-data values come from Pyro's own HMC machinery (``initialize_model``'s potential
function, with its transforms and log-det-Jacobians), independent of the kernel's messenger.
For ``K`` independent random batches the z-score ``(mean - full) / (sd / sqrt(K))`` of the log
joint and of every gradient coordinate must stay below 4; the same test applied to a wrongly
scaled estimate (the batch likelihood without the ``N / B`` factor) must fail by far, so the
test has power. The kernel's own batches (epochs without replacement) are not independent; for
them the stronger identity holds: over one epoch the mean estimate equals the full-data value
up to rounding.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.mcmc.util import initialize_model
from seams import evaluate
from sgld_models import linreg, make_linreg_data

from pyro_bnp import SGLD

N, B, K = 200, 20, 2000
Z = 4.0

Params = dict[str, torch.Tensor]


def linreg_unscaled(x: torch.Tensor, y: torch.Tensor) -> None:
    """:func:`sgld_models.linreg` whose batch likelihood misses the plate's ``N / B`` factor."""
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]) as idx, poutine.scale(scale=len(idx) / x.shape[0]):
        pyro.sample("y", dist.Normal(x[idx] @ w + b, s), obs=y[idx])


def linreg_own_batches(x: torch.Tensor, y: torch.Tensor) -> None:
    """:func:`sgld_models.linreg` that subsamples its data plate itself (Pyro's random batch)."""
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0], subsample_size=B) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w + b, s), obs=y[idx])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_linreg_data(n=N, d=3, seed=3)
    return x.double(), y.double()


def _point() -> Params:
    """An unconstrained point away from the posterior mode (large likelihood gradient)."""
    return {
        "w": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64),
        "b": torch.tensor(-0.4, dtype=torch.float64),
        "s": torch.tensor(0.2, dtype=torch.float64),
    }


def _flat(lp: float, grads: Params) -> torch.Tensor:
    """``[log joint, -grad U]`` flattened in sorted site order."""
    parts = [torch.tensor([lp], dtype=torch.float64)]
    parts += [-grads[k].reshape(-1) for k in sorted(grads)]
    return torch.cat(parts)


def _full_reference(x: torch.Tensor, y: torch.Tensor, z: Params) -> torch.Tensor:
    _, potential_fn, _, _ = initialize_model(linreg, model_args=(x, y))
    leaves = {k: v.clone().requires_grad_() for k, v in z.items()}
    pe = potential_fn(leaves)
    grads = torch.autograd.grad(pe, [leaves[k] for k in sorted(leaves)])
    return _flat(-float(pe.detach()), dict(zip(sorted(leaves), grads, strict=True)))


def _estimates(kernel: SGLD, z: Params, num: int, batches=None) -> torch.Tensor:
    """``num`` evaluations of the kernel's potential at ``z``: on the chain's own mini-batch
    stream, or on ``batches()`` (independent batches)."""
    if batches is None:
        return torch.stack([_flat(*evaluate(kernel, z)) for _ in range(num)])
    return torch.stack([_flat(*kernel.potential(z, batches())) for _ in range(num)])


def _z_scores(draws: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    se = draws.std(0) / len(draws) ** 0.5
    return (draws.mean(0) - full) / se


def _independent_batches(seed: int):
    """Independent uniform batches instead of the kernel's epochs (for the z-test)."""
    g = torch.Generator().manual_seed(seed)
    return lambda: {"data": torch.randperm(N, generator=g)[:B]}


def test_full_data_log_joint_matches_pyro_potential(seed):
    x, y = _data()
    kernel = SGLD(linreg, preconditioner="identity")
    kernel.setup(0, x, y)
    z = _point()
    mine = _flat(*evaluate(kernel, z))
    torch.testing.assert_close(mine, _full_reference(x, y, z), rtol=1e-12, atol=1e-10)


def test_minibatch_estimate_is_unbiased(seed):
    x, y = _data()
    z = _point()
    full = _full_reference(x, y, z)
    kernel = SGLD(linreg, preconditioner="identity", subsample_size={"data": B})
    kernel.setup(0, x, y)
    zs = _z_scores(_estimates(kernel, z, K, _independent_batches(seed)), full)
    print("z (lp, dlp/db, dlp/ds, dlp/dw x3):", zs.numpy().round(2))
    assert torch.all(zs.abs() < Z), zs

    # Power: the same test on the estimate without the N / B factor fails by far.
    wrong = SGLD(linreg_unscaled, preconditioner="identity", subsample_size={"data": B})
    wrong.setup(0, x, y)
    zw = _z_scores(_estimates(wrong, z, K, _independent_batches(seed)), full)
    print("wrongly scaled z:", zw.numpy().round(1))
    assert torch.all(zw.abs() > 10 * Z), zw


def test_model_subsampling_itself_is_unbiased(seed):
    """A model whose plate sets ``subsample_size`` works with ``subsample_size=None``."""
    x, y = _data()
    z = _point()
    full = _full_reference(x, y, z)
    kernel = SGLD(linreg_own_batches, preconditioner="identity")
    kernel.setup(0, x, y)
    assert kernel.potential.own_plates == {"data": (N, B)} and kernel.potential.num_data == N
    zs = _z_scores(_estimates(kernel, z, K), full)
    print("own-plate z:", zs.numpy().round(2))
    assert torch.all(zs.abs() < Z), zs


def test_one_epoch_averages_to_full_value(seed):
    """Over one epoch (``N / B`` consecutive batches) every row is used once: exact mean."""
    x, y = _data()
    z = _point()
    full = _full_reference(x, y, z)
    kernel = SGLD(linreg, preconditioner="identity", subsample_size={"data": B})
    kernel.setup(0, x, y)
    for _ in range(3):  # three consecutive epochs
        draws = _estimates(kernel, z, N // B)
        assert draws.std(0).min() > 1e-3  # the batches do differ
        torch.testing.assert_close(draws.mean(0), full, rtol=1e-12, atol=1e-10)

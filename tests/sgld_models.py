"""Small Pyro models shared by the tests (importable by spawned worker processes)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def linreg(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Linear regression with a HalfNormal noise scale (a constrained site)."""
    d = x.shape[-1]
    w = pyro.sample(
        "w", dist.Normal(torch.zeros(d, dtype=x.dtype, device=x.device), 1.0).to_event(1)
    )
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=x.dtype, device=x.device), 1.0))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype, device=x.device)))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w + b, s), obs=None if y is None else y[idx])


def make_linreg_data(n: int = 500, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.arange(1.0, d + 1.0)
    y = x @ w + 0.5 + 0.5 * torch.randn(n, generator=g)
    return x, y


def gaussian_target(loc: torch.Tensor, scale: float) -> None:
    """No data: theta ~ N(loc, scale^2) independently, so U is an exact quadratic."""
    pyro.sample("theta", dist.Normal(loc, scale).to_event(1))


def conjugate_linreg(x: torch.Tensor, y: torch.Tensor, prior_scale: float, noise: float) -> None:
    """Bayesian linear regression with known noise: the posterior of [b; w] is Gaussian."""
    d = x.shape[-1]
    w = pyro.sample(
        "w", dist.Normal(torch.zeros(d, dtype=x.dtype, device=x.device), prior_scale).to_event(1)
    )
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=x.dtype, device=x.device), prior_scale))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w + b, noise), obs=y[idx])


def exact_posterior(
    x: torch.Tensor, y: torch.Tensor, prior_scale: float, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of [b; w] for :func:`conjugate_linreg` (float64)."""
    xt = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64), x.double()], 1)
    prec = xt.T @ xt / noise**2 + torch.eye(xt.shape[1], dtype=torch.float64) / prior_scale**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (xt.T @ y.double()) / noise**2
    return mean, cov


def badly_scaled_features(
    n: int, scales: list[float], means: list[float], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-centred, badly scaled features x_j ~ N(m_j, s_j^2) and y = x w + b + N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(scales, dtype=torch.float64)
    m = torch.tensor(means, dtype=torch.float64)
    x = m + s * torch.randn(n, len(scales), generator=g, dtype=torch.float64)
    w = torch.linspace(-1.0, 1.0, len(scales), dtype=torch.float64) / s
    y = x @ w + 0.7 + torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def sgld_stationary_covariance(
    x: torch.Tensor,
    y: torch.Tensor,
    prior_scale: float,
    noise: float,
    step_size: float,
    batch_size: int,
    m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stationary covariance of SGLD with constant preconditioner ``M`` on the conjugate model.

    The chain is linear,
    ``theta2 = theta - (eps/2) M (Lambda (theta - mu) + zeta) + sqrt(eps) A xi``,
    with mini-batch gradient noise ``zeta`` of covariance ``C`` (taken at the posterior mean,
    sampling without replacement). Its covariance ``S`` solves the discrete Lyapunov equation
    ``S = B S B^T + (eps^2/4) M C M + eps M`` with ``B = I - (eps/2) M Lambda``. With ``C = 0``
    and full gradients this is the Gaussian law of DESIGN.md section 3.
    """
    import scipy.linalg

    mean, cov = exact_posterior(x, y, prior_scale, noise)
    n = x.shape[0]
    xt = torch.cat([torch.ones(n, 1, dtype=torch.float64), x.double()], 1)
    prec = torch.linalg.inv(cov)
    d = prec.shape[0]
    mm = torch.eye(d, dtype=torch.float64) if m is None else m.double()
    resid = y.double() - xt @ mean
    per_datum = -xt * resid[:, None] / noise**2  # gradient of -log lik of each row
    if batch_size < n:
        pop = torch.cov(per_datum.T, correction=0)
        c = (n**2 / batch_size) * (n - batch_size) / (n - 1) * pop
    else:
        c = torch.zeros(d, d, dtype=torch.float64)
    b = torch.eye(d, dtype=torch.float64) - 0.5 * step_size * mm @ prec
    q = 0.25 * step_size**2 * mm @ c @ mm.T + step_size * mm
    s = scipy.linalg.solve_discrete_lyapunov(b.numpy(), q.numpy())
    return torch.from_numpy(s)

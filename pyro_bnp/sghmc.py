r"""Stochastic gradient Hamiltonian Monte Carlo on the same core as :class:`pyro_bnp.SGLD`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_bnp.chain import ChainState
from pyro_bnp.integrators import sghmc_step
from pyro_bnp.kernel import SGMCMC, Schedule, _check_positive

__all__ = ["SGHMC"]


class SGHMC(SGMCMC):
    r"""Stochastic gradient HMC (Chen, Fox & Guestrin 2014) with BNP, RMSprop or no preconditioner.

    Each update, with the mini-batch gradient ``g = grad U_hat(theta)`` (as for :class:`SGLD`)
    and a preconditioner ``M = A A^T``:

    .. math::

        m_{t+1} &= (1 - h\alpha)\, m_t - h A^\top g(\theta_t)
            + \sqrt{h T (2\alpha - h T \hat\beta)}\; \xi_t, \qquad \xi_t \sim N(0, I), \\
        \theta_{t+1} &= \theta_t + h A\, m_{t+1}.

    ``h`` is ``step_size``, ``alpha`` the ``friction`` (a rate: ``h alpha`` is the fraction of
    the momentum lost per update), ``beta_hat`` the ``noise_estimate`` of the gradient noise
    (0: none assumed), ``T`` the temperature. Without gradient noise and for small ``h`` it
    targets ``p_T(theta, m) ∝ exp(-(U(theta) + |m|^2 / 2) / T)``, i.e. ``theta ~ pi_T`` and
    ``m ~ N(0, T I)``. No Metropolis correction: the chain is biased by ``O(h^2)``; for a
    Gaussian target ``N(mu, sigma^2)`` with ``M = p`` and full gradients the stationary
    variance of this integrator is exactly
    ``T sigma^2 (1 - h T beta_hat / (2 alpha)) / (1 - h^2 p / (2 (2 - h alpha) sigma^2))``
    (docs/usage.md, tested).

    **The momentum lives in the preconditioner's coordinates** ``z`` (``theta = A z``): it
    is plain SGHMC on ``U(A z)``, whose gradient is ``A^T g``, mapped back by ``A``. With a
    frozen preconditioner (``freeze_after_warmup=True``) ``A`` is constant, the change of
    variables is linear and the chain targets the same distribution of ``theta``; while BNP's or
    RMSprop's statistics adapt, the correction term is dropped, as pSGLD does.

    **Parametrisation.** The same ``(h, alpha, beta)`` as BlackJAX's ``sghmc`` (``step_size``,
    ``alpha``, ``beta``) and posteriors' ``sghmc`` (``lr``, ``alpha``, ``beta``), with unit
    mass; they move ``theta`` with the *old* momentum (explicit Euler), we with the new one
    (Chen et al.'s eq. 15, semi-implicit), whose stationary variance is the law above. With
    ``h alpha = 1`` (no momentum kept) the update is :class:`SGLD` with ``eps = 2 h^2``. Chen
    et al.'s ``(eta, alpha, beta_hat)`` with ``v = eta r`` are ``eta = h^2``,
    ``alpha_Chen = h alpha``, ``beta_Chen = h beta_hat``.

    **Momentum.** It starts at zero (from rest), is set back to zero when an update is
    rejected (a non-finite proposal: the chain stays and restarts from rest), and with
    ``resample_momentum=k`` is drawn afresh from ``N(0, T I)`` before every ``k``-th update
    (``k`` counts updates, warmup included). It is part of :meth:`state_dict` (resume is exact).

    Parameters
    ----------
    model : callable
        As for :class:`SGLD`.
    step_size : float or callable
        ``h``, or a schedule ``t -> h`` (e.g. :class:`pyro_bnp.schedules.Cyclical`: cyclical
        SGHMC, Zhang et al. 2020). ``h * friction`` must stay in ``(0, 1]``.
    friction : float
        ``alpha > 0``.
    noise_estimate : float
        ``beta_hat >= 0``, with ``h T beta_hat <= 2 alpha``.
    resample_momentum : int or None
        Redraw the momentum every this many updates (None: never).
    **kwargs
        Every other argument of :class:`SGLD` (``subsample_size``, ``preconditioner``,
        ``temperature``, ``thin``, ``init_strategy``, ``modules``, ``max_rejections``,
        ``max_abs_param``).

    Notes
    -----
    BNP's prior-stability check and ``prior_cap`` are given the SGLD step size with the same
    linear stability, ``eps = 2 h^2 / (2 - h alpha)`` (from the variance law above).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        step_size: float | Schedule = 1e-3,
        *,
        friction: float = 0.1,
        noise_estimate: float = 0.0,
        resample_momentum: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, step_size, **kwargs)
        self.friction = _check_positive("friction", friction)
        self.noise_estimate = _check_positive("noise_estimate", noise_estimate, allow_zero=True)
        if resample_momentum is not None and (
            isinstance(resample_momentum, bool)
            or not isinstance(resample_momentum, int)
            or resample_momentum < 1
        ):
            raise ValueError(
                f"resample_momentum must be None or a positive int, got {resample_momentum!r}"
            )
        self.resample_momentum = resample_momentum
        if not callable(self.step_size):
            self._check_step(float(self.step_size), 0)

    def _check_step(self, h: float, t: int) -> None:
        if h * self.friction > 1.0:
            raise ValueError(
                f"SGHMC: step_size * friction = {h * self.friction:.3g} > 1 at update {t}: the "
                "momentum would change sign every update; lower the step size or the friction"
            )
        if h * self.temperature * self.noise_estimate > 2.0 * self.friction:
            raise ValueError(
                f"SGHMC: noise_estimate={self.noise_estimate:g} exceeds 2 friction / (h T) = "
                f"{2.0 * self.friction / (h * self.temperature):.3g} at step size {h:.3g}"
            )

    def _sgld_equivalent(self, step_size: float) -> float:
        return 2.0 * step_size**2 / (2.0 - step_size * self.friction)

    def _momentum(self, chain: ChainState) -> dict[str, Tensor]:
        m = chain.aux.get("momentum")
        k = self.resample_momentum
        if k is not None and chain.t % k == 0:
            sd = math.sqrt(self.temperature)
            return {
                n: torch.randn(v.shape, generator=chain.rng, dtype=v.dtype, device=v.device) * sd
                for n, v in sorted(chain.z.items())
            }
        return m if m is not None else {n: torch.zeros_like(v) for n, v in chain.z.items()}

    def _integrator(self) -> str:
        return "sghmc"

    def _update(self, chain: ChainState) -> bool:
        """One SGHMC update of ``chain`` (in place); False if the proposal was rejected."""
        h = chain.eps = self._step_size_at(chain.t)
        self._check_step(h, chain.t)
        pre = self.preconditioner
        pre.update(chain.grads, self._sgld_equivalent(h))
        m = self._momentum(chain)
        z_new, m_new = sghmc_step(
            pre, chain.z, m, chain.grads, h, self.friction, self.noise_estimate,
            self.temperature, chain.rng,
        )  # fmt: skip
        chain.t += 1
        accepted = self._accept_or_reject(chain, z_new)
        chain.aux["momentum"] = (
            m_new if accepted else {n: torch.zeros_like(v) for n, v in m.items()}
        )
        return accepted

    def config(self) -> dict[str, Any]:
        """Return the kernel's settings (SGLD's plus friction, noise estimate, resampling)."""
        cfg = super().config()
        cfg.update(
            friction=self.friction,
            noise_estimate=self.noise_estimate,
            resample_momentum=repr(self.resample_momentum),
        )
        return cfg

r"""The update equations, written once each (pure torch, never imports pyro).

:func:`sgld_step` is the SGLD update of every kernel and preconditioner:

.. math::

    \theta' = \theta + s\, A\,(\xi - k\, A^\top g), \qquad s = \sqrt{\epsilon T},\quad
    k = \frac{\epsilon}{2 s},\quad \xi \sim N(0, I),

that is :math:`\theta - \frac{\epsilon}{2} M g + \sqrt{\epsilon T} A \xi` with
:math:`M = A A^\top` and ``g`` the mini-batch gradient of ``U_hat``. The preconditioner supplies
the parts (:meth:`~pyro_bnp.Preconditioner.noise_minus_drift` for ``u = xi - k A^T g`` and
:meth:`~pyro_bnp.Preconditioner.move` for ``theta + s A u``), each written into the noise buffer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_bnp.preconditioners import Params, Preconditioner, standard_normal_like

__all__ = ["sghmc_step", "sgld_step"]

# ``alpha=`` of torch's fused ops must be representable in float32, and ``k = (eps/2) / s``
# must not overflow: below these the scale is folded into the noise instead (same equation).
_TINY = float(torch.finfo(torch.float32).tiny)
_HUGE = 1e30


def sgld_step(
    preconditioner: Preconditioner,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    step_size: float,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Params:
    r"""One SGLD move ``theta + sqrt(eps T) A (xi - k A^T g)`` (new tensors; inputs are kept).

    Parameters
    ----------
    preconditioner : Preconditioner
        Gives ``A`` and ``A^T`` (its state is read, not changed: call ``update`` first).
    params : Mapping[str, Tensor]
        ``theta``, unconstrained, by site.
    grads : Mapping[str, Tensor]
        ``g = grad U_hat(theta)``, same keys and shapes.
    step_size : float
        ``eps`` (the variance of the injected noise at ``T = 1``; the drift is ``eps / 2``).
    temperature : float
        ``T >= 0``; at ``T = 0`` no noise is drawn and the move is ``theta - (eps/2) M g``.
    generator : torch.Generator, optional
        Source of ``xi``, drawn site by site in sorted name order.

    Returns
    -------
    dict[str, Tensor]
        The new position.
    """
    half = 0.5 * step_size
    scale = math.sqrt(step_size * temperature)
    if temperature > 0:
        xi = standard_normal_like(params, generator)
        if scale >= _TINY and half < _HUGE * scale:
            return preconditioner.move(
                params, preconditioner.noise_minus_drift(xi, grads, half / scale), scale
            )
        # the one tiny-scale guard: theta + A (s xi - (eps/2) A^T g)
        xi = {k: x.mul_(scale) for k, x in xi.items()}
    else:
        xi = {k: torch.zeros_like(v) for k, v in params.items()}
    return preconditioner.move(params, preconditioner.noise_minus_drift(xi, grads, half), 1.0)


def sghmc_step(
    preconditioner: Preconditioner,
    params: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    step_size: float,
    friction: float,
    noise_estimate: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Params, Params]:
    r"""One SGHMC move; returns the new ``(theta, m)`` (new tensors; inputs are kept).

    .. math::

        m' = (1 - h\alpha)\, m - h A^\top g + \sqrt{hT(2\alpha - hT\hat\beta)}\, \xi, \qquad
        \theta' = \theta + h A m',

    with ``h`` the step size, ``alpha`` the friction, ``beta_hat`` the gradient-noise estimate
    and the momentum ``m`` in the preconditioner's coordinates (``theta = A z``). It is computed
    as ``u = xi - k A^T g`` (:meth:`~pyro_bnp.Preconditioner.noise_minus_drift`, ``k = h / s``,
    ``s`` the noise scale), ``m' = (1 - h alpha) m + s u`` and ``theta + h A m'``
    (:meth:`~pyro_bnp.Preconditioner.move`), with :func:`sgld_step`'s tiny-scale guard.

    Raises
    ------
    ValueError
        If the noise variance ``h T (2 alpha - h T beta_hat)`` is negative.
    """
    h = step_size
    var = h * temperature * (2.0 * friction - h * temperature * noise_estimate)
    if var < 0.0:
        raise ValueError(
            f"SGHMC: the noise variance h T (2 friction - h T noise_estimate) = {var:.3g} is "
            f"negative at step size {h:.3g}: lower noise_estimate={noise_estimate:g} below "
            f"2 friction / (h T) = {2.0 * friction / (h * temperature):.3g}"
        )
    scale, decay = math.sqrt(var), 1.0 - h * friction
    if var > 0.0:
        xi = standard_normal_like(params, generator)
        if scale >= _TINY and h < _HUGE * scale:
            u = preconditioner.noise_minus_drift(xi, grads, h / scale)
            new_m = {k: u[k].mul_(scale).add_(momentum[k], alpha=decay) for k in params}
            return _position(preconditioner, params, new_m, h), new_m
        xi = {k: x.mul_(scale) for k, x in xi.items()}  # the guard: scale folded into the noise
    else:  # T = 0 (or an exactly cancelled noise): a deterministic heavy-ball step
        xi = {k: torch.zeros_like(v) for k, v in params.items()}
    u = preconditioner.noise_minus_drift(xi, grads, h)
    new_m = {k: u[k].add_(momentum[k], alpha=decay) for k in params}
    return _position(preconditioner, params, new_m, h), new_m


def _position(
    preconditioner: Preconditioner,
    params: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor],
    h: float,
) -> Params:
    """``theta + h A m`` (``move`` writes into its buffer: it gets a copy of ``m``)."""
    return preconditioner.move(params, {k: m.clone() for k, m in momentum.items()}, h)

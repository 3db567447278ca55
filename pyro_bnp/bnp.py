r"""Batch Normalization Preconditioning (BNP) for SGLD (pure torch, never imports pyro).

BNP (Lange, Helfrich, Ye, "Batch Normalization Preconditioning for Neural Network Training",
JMLR 23(72), 2022, arXiv 2108.01110; Algorithms 2 and 3) preconditions the gradient of every
dense or convolutional layer with the running mean and variance of the layer's *input*, which
is what batch normalization would have normalised, without changing the network. Here it is
used as the preconditioner ``M = A A^T`` of stochastic gradient Langevin dynamics. The SGLD
paper that proposes this (Lange, Deng, Ye, Lin, J. Mach. Learn. 2(1), 2023) is not publicly
available in full; the sampler below is our derivation, consistent with the JMLR paper.

The layer statistics themselves are kept by :class:`pyro_bnp.layers.RunningInputStats`
(forward pre-hooks on the network); this module only needs objects following the
:class:`~pyro_bnp.preconditioners.InputStatistics` protocol.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_bnp.chain import suggest_step_size
from pyro_bnp.preconditioners import (
    BindContext,
    LayerRef,
    Params,
    Preconditioner,
    RMSprop,
)

__all__ = ["BNP", "balance_factor", "floored_variance"]

_STATS_INITS = ("batch", "paper")


def floored_variance(var: Tensor, eps1: float, eps2: float) -> Tensor:
    """Return the floored input variance ``s^2 = var + eps1 * max(var) + eps2`` of one layer.

    Parameters
    ----------
    var : Tensor
        Running variance per input feature (dense) or input channel (conv), shape ``[in]``.
    eps1 : float
        Relative floor: caps the range of ``s^2`` within a layer at about ``1 / eps1``.
    eps2 : float
        Absolute floor (keeps ``s^2 > 0`` when every input is constant).

    Returns
    -------
    Tensor
        ``s^2``, same shape and dtype as ``var``.
    """
    return torch.add(var, var.max(), alpha=eps1).add_(eps2)


def balance_factor(fan_in: int, batch_size: int, spatial_size: int = 1) -> float:
    """Return the block-balancing factor ``q^2 = max(fan_in / N, sqrt(H W))``.

    For a dense layer ``fan_in = in`` and ``H W = 1``, so ``q^2 = max(in / N, 1)``; for a
    convolution ``fan_in = kh * kw * c_in / groups`` (JMLR paper, Section 4).

    Parameters
    ----------
    fan_in : int
        Inputs per output neuron.
    batch_size : int
        Rows ``N`` of the mini-batch the statistics were last updated with.
    spatial_size : int
        ``H * W`` of the input feature map (``L`` for 1-d convolutions, 1 for dense layers).

    Returns
    -------
    float
        ``q^2``.
    """
    return max(fan_in / max(int(batch_size), 1), math.sqrt(max(int(spatial_size), 1)))


def _arrowhead_max(alpha: float, v2: Tensor, r: Tensor, iters: int = 80) -> float:
    """Largest eigenvalue of ``[[alpha, -v^T], [-v, diag(r)]]`` given ``v2 = v^2``.

    The root above ``max(r)`` of ``alpha - x + sum v2 / (x - r)``, which decreases there;
    bracketed by ``L = max(alpha, max r)`` and ``L + |v|`` (Gershgorin-type bound).
    """
    lo = max(alpha, float(r.max()))
    hi = lo + math.sqrt(float(v2.sum()))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        f = alpha - mid + float((v2 / (mid - r)).sum())
        if f > 0:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class _Block:
    """Static layout of one layer, plus the per-step cache derived from its statistics."""

    ref: LayerRef
    dense: bool
    shape: torch.Size  # weight shape
    shape4: tuple[int, int, int, int]  # (groups, out / groups, in / groups, kernel size)
    fan_in: int
    dtype: torch.dtype
    device: torch.device
    one: Tensor  # 0-d 1.0: ``torch.add(var, one, alpha=x)`` adds a float without wrapping it
    fresh: bool = False
    q: float = 1.0
    q2: float = 1.0
    iq: float = 1.0  # 1 / q, folded into the scalar factors of the maps
    mu: Tensor | None = None  # [in]
    s2: Tensor | None = None  # [in]
    r: Tensor | None = None  # 1 / s: dense [in], conv [G, 1, in/G, 1]
    c: Tensor | None = None  # mu / s: same shape as ``r``
    a: Tensor | None = None  # r / q, made on demand by the generic maps
    ca: Tensor | None = None  # c / q, made with ``a``


class BNP(Preconditioner):
    r"""Batch Normalization Preconditioning for SGLD, optionally combined with RMSprop.

    **Per output neuron** ``i`` of a dense layer ``a = W h + b`` with parameters
    ``w_hat = [b_i; w_i]`` (JMLR paper eq. 12-15, Algorithm 2):

    .. math::

        s^2 = \mathrm{var} + \epsilon_1 \max(\mathrm{var}) + \epsilon_2, \quad
        q^2 = \max(\mathrm{in} / N, 1), \quad
        P = \begin{pmatrix} 1 & -(\mu / s)^\top \\ 0 & \mathrm{diag}(1 / s) \end{pmatrix},
        \quad M = A A^\top = \frac{1}{q^2} P P^\top, \quad A = P / q,

    where ``mu`` and ``var`` are running averages of the mean and (biased) variance of the
    layer's *input* ``h`` over mini-batches of ``N`` rows. The drift is computed cheaply as
    ``Gw = (gW - gb mu^T) / s^2 / q^2`` and ``Gb = gb / q^2 - Gw mu``; the noise as
    ``n_w = xi_w / (q s)`` and ``n_b = xi_b / q - (xi_w / s) . mu / q``.

    **Convolutions** (Algorithm 3): statistics per input channel over batch x space,
    ``q^2 = max(kh kw c_in / (groups N), sqrt(H W))``, and the same ``P`` per output channel
    ``o`` acting on ``[b_o; vec(W_o)]`` with each input channel's ``mu, s`` repeated over the
    kernel positions (with groups, the weight's channel ``p`` of output channel ``o`` is the
    input channel ``(o // (out / groups)) * (in / groups) + p``). Stride, dilation and padding
    do not change the statistics (padding zeros are not counted). Layers without bias use the
    diagonal part only: ``M = diag(1 / s^2) / q^2``.

    **SGLD update** (our derivation): ``theta <- theta - (eps/2) M g + sqrt(eps T) A xi`` with
    ``g`` the mini-batch gradient of ``U_hat``; it targets ``pi(theta) ∝ exp(-U(theta) / T)``.
    Sites that are not the weight or bias of a layer get ``M = A = I``, or RMSprop's diagonal
    with ``others="rmsprop"`` (``M`` is then block diagonal: BNP per layer, pSGLD on the rest).

    **BNP + RMSprop** (``rmsprop=RMSprop(...)``): pSGLD in BNP coordinates ``z`` with
    ``theta = (P / q) z``: ``g_z = P^T g / q`` (per neuron ``g_z_b = g_b / q``,
    ``g_z_w = (g_w - mu g_b) / (q s)``), the RMSprop state ``V`` tracks ``g_z`` (with the
    per-datum convention of :class:`~pyro_bnp.preconditioners.RMSprop`), and drift
    ``G_z g_z`` and noise ``sqrt(G_z) xi`` are taken in ``z`` and mapped back with ``P / q``.
    So ``M = P G_z P^T / q^2`` (symmetric positive definite) and ``A = P sqrt(G_z) / q``.
    The RMSprop and BNP matrices are never multiplied in ``theta``-space (that product is not
    symmetric). Sites outside layers get plain RMSprop.

    **The divergence term Gamma** of preconditioned SGLD is not added. It is exactly zero when
    ``M`` of a layer is a function of the *current* statistics only, because those depend on
    the parameters of earlier layers only (``d M_l / d theta_l = 0``). With running averages
    ``M`` depends on the chain's history, which Gamma cannot express; we drop it, as pSGLD does.
    After :meth:`freeze` (``freeze_after_warmup=True``) ``M`` is constant, there is no Gamma at
    all and the chain is an exact preconditioned SGLD.

    Parameters
    ----------
    rho : float
        Decay of the running mean / variance, in ``[0, 1)`` (paper: 0.99). Used when the layer
        statistics are created: pass :meth:`stats_options` to
        :func:`pyro_bnp.layers.find_layers`.
    eps1 : float
        Relative variance floor, ``>= 0`` (paper: 1e-2). It caps the preconditioner's range
        within a layer at about ``1 / eps1`` in variance: inputs whose variances span more than
        that keep their low-variance directions under-preconditioned.
    eps2 : float
        Absolute variance floor, ``> 0`` (paper: 1e-4).
    freeze_after_warmup : bool
        If true the kernel calls :meth:`freeze` at the end of warmup.
    rmsprop : RMSprop or None
        Combine with RMSprop in BNP coordinates (name ``"bnp+rmsprop"``).
    init : {"batch", "paper"}
        Initial statistics: from the first mini-batch (default; safe on badly scaled inputs)
        or the paper's ``mu = 0, var = 1``. Stored as :attr:`stats_init`.
    prior_cap : float or None
        ``kappa`` in ``(0, 2)``, or None (default: the paper's BNP). For layers whose
        i.i.d. Normal priors the kernel reports (:meth:`set_priors`), keep the prior's
        stability number ``nu`` (:meth:`prior_stability`) at most ``kappa`` at the current step
        size: first floor ``s^2`` at ``eps / (2 kappa q^2 sigma_w^2)`` (only the low-variance
        inputs that make the prior stiff are touched), then, if an upper bound of ``nu`` still
        exceeds ``kappa`` (the bias coupling), enlarge that layer's ``q^2`` by ``nu / kappa``.
        ``M`` stays ``P P^T / q^2`` for every layer, drift and noise from the same ``A``; it
        now also depends on the step size (with a schedule a frozen ``M`` changes with it).
        Without RMSprop only.
    others : {"identity", "rmsprop"} or RMSprop
        Preconditioning of the sites that are not a layer's weight or bias (a noise scale, a
        Gaussian process's length scale, ...): the identity (default, the paper) or RMSprop
        (``"rmsprop"`` for ``RMSprop()``, or an instance). Under the identity such a site's
        step follows its raw curvature, which for the noise scale of a BNN regression grows
        like ``N / sigma^2`` and threw ``sigma`` from 0.67 to 70 in the first update of the
        early-convergence experiment. Plain BNP only: ``rmsprop=`` already covers these sites.
        ``freeze`` and ``freeze_after_warmup`` apply to it too.
    """

    name = "bnp"

    def __init__(
        self,
        rho: float = 0.99,
        eps1: float = 1e-2,
        eps2: float = 1e-4,
        freeze_after_warmup: bool = False,
        rmsprop: RMSprop | None = None,
        init: str = "batch",
        prior_cap: float | None = None,
        others: str | RMSprop = "identity",
    ) -> None:
        super().__init__()
        if not isinstance(rho, (int, float)) or not (0.0 <= rho < 1.0):
            raise ValueError(f"BNP: rho must be in [0, 1), got {rho!r}")
        if not isinstance(eps1, (int, float)) or not (0.0 <= eps1 < math.inf):
            raise ValueError(f"BNP: eps1 must be non-negative and finite, got {eps1!r}")
        if not isinstance(eps2, (int, float)) or not (0.0 < eps2 < math.inf):
            raise ValueError(f"BNP: eps2 must be positive and finite, got {eps2!r}")
        if not isinstance(freeze_after_warmup, bool):
            raise ValueError(
                f"BNP: freeze_after_warmup must be a bool, got {freeze_after_warmup!r}"
            )
        if rmsprop is not None and not isinstance(rmsprop, RMSprop):
            raise ValueError(f"BNP: rmsprop must be None or an RMSprop instance, got {rmsprop!r}")
        if init not in _STATS_INITS:
            raise ValueError(f"BNP: init must be one of {_STATS_INITS}, got {init!r}")
        if prior_cap is not None and (
            isinstance(prior_cap, bool)
            or not isinstance(prior_cap, (int, float))
            or not (0.0 < prior_cap < 2.0)
        ):
            raise ValueError(f"BNP: prior_cap must be None or in (0, 2), got {prior_cap!r}")
        if prior_cap is not None and rmsprop is not None:
            raise ValueError("BNP: prior_cap applies to plain BNP only (rmsprop=None)")
        if isinstance(others, RMSprop):
            other_pre: RMSprop | None = others
        elif isinstance(others, str) and others in ("identity", "rmsprop"):
            other_pre = RMSprop() if others == "rmsprop" else None
        else:
            raise ValueError(
                f"BNP: others must be 'identity', 'rmsprop' or an RMSprop instance, got {others!r}"
            )
        if other_pre is not None and rmsprop is not None:
            raise ValueError(
                "BNP: others applies to plain BNP only: with rmsprop= the sites outside the "
                "layers already get RMSprop"
            )
        self.rho = float(rho)
        self.eps1 = float(eps1)
        self.eps2 = float(eps2)
        self.freeze_after_warmup = freeze_after_warmup
        self.rmsprop = rmsprop
        self.stats_init = init
        self.name = "bnp+rmsprop" if rmsprop is not None else "bnp"
        self._blocks: dict[str, _Block] = {}  # by layer name
        self._gz: tuple[Mapping[str, Tensor], Params] | None = None  # update()'s A^T g
        self.prior_cap = None if prior_cap is None else float(prior_cap)
        self._priors: dict[str, tuple[float | None, float]] = {}  # layer -> (var_b, var_w)
        self._cap_eps: float | None = None  # the step size the blocks were capped for
        self.others = other_pre
        self._other_names: tuple[str, ...] = ()  # sites outside the layers (with ``others``)
        self._bound_without_layers = False  # bound to a chain whose network had no layer

    # -- life cycle --------------------------------------------------------------------
    def stats_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`pyro_bnp.layers.find_layers` (``rho``, ``init``)."""
        return {"rho": self.rho, "init": self.stats_init}

    def layer_options(self) -> dict[str, Any]:
        """BNP wants the network's layers: :meth:`stats_options` for their statistics."""
        return self.stats_options()

    def bind(self, context: BindContext) -> None:
        """Reset the state for a new chain and register the layers and their priors.

        The layers' statistics are un-frozen but not reset (they belong to the hooks that
        :func:`pyro_bnp.layers.find_layers` created). The i.i.d. Normal priors of a layer's
        weight (and bias) in ``context.priors`` are registered as by :meth:`set_priors`.

        Raises
        ------
        ValueError
            If a layer's sites are missing from ``context.params``, appear in two layers, or
            have shapes that do not match the statistics.
        """
        super().bind(context)
        params, layers = context.params, context.layers
        self._blocks = {}
        self._gz = None
        self._priors, self._cap_eps = {}, None
        self._bound_without_layers = not layers
        used: set[str] = set()
        for ref in layers:
            block = self._make_block(ref, params)
            for site in (ref.weight, ref.bias):
                if site is None:
                    continue
                if site in used:
                    raise ValueError(f"BNP: layers: site {site!r} belongs to two layers")
                used.add(site)
            if ref.name in self._blocks:
                raise ValueError(f"BNP: layers: duplicate layer name {ref.name!r}")
            self._blocks[ref.name] = block
            ref.stats.frozen = False
        if self.rmsprop is not None:
            self.rmsprop.bind(context)
        self._other_names = tuple(k for k in params if k not in used)
        if self.others is not None:
            self.others.bind(
                BindContext(self._other_sites(params), context.num_data, (), context.priors)
            )
        priors: dict[str, tuple[float | None, float]] = {}
        for ref in layers:
            w = context.priors.get(ref.weight)
            if w is None:
                continue
            b = None if ref.bias is None else context.priors.get(ref.bias)
            priors[ref.name] = (None if b is None else b.var, w.var)
        if priors:
            self.set_priors(priors)

    @staticmethod
    def _make_block(ref: LayerRef, params: Mapping[str, Tensor]) -> _Block:
        if ref.kind not in ("linear", "conv"):
            raise ValueError(f"BNP: layers: kind of {ref.name!r} must be 'linear' or 'conv'")
        if ref.weight not in params:
            raise ValueError(f"BNP: layers: weight site {ref.weight!r} is not in params")
        if ref.bias is not None and ref.bias not in params:
            raise ValueError(f"BNP: layers: bias site {ref.bias!r} is not in params")
        w = params[ref.weight]
        num_in = int(ref.stats.mean.numel())
        groups = int(ref.groups)
        dense = ref.kind == "linear"
        if dense and (w.dim() != 2 or w.shape[1] != num_in or groups != 1):
            raise ValueError(
                f"BNP: layers: weight {ref.weight!r} of shape {tuple(w.shape)} does not match "
                f"a dense layer with {num_in} inputs"
            )
        if not dense and (
            w.dim() < 3 or groups < 1 or w.shape[0] % groups or w.shape[1] * groups != num_in
        ):
            raise ValueError(
                f"BNP: layers: weight {ref.weight!r} of shape {tuple(w.shape)} does not match "
                f"a convolution with {num_in} input channels and groups={groups}"
            )
        out = int(w.shape[0])
        if ref.bias is not None and tuple(params[ref.bias].shape) != (out,):
            raise ValueError(
                f"BNP: layers: bias {ref.bias!r} must have shape ({out},), "
                f"got {tuple(params[ref.bias].shape)}"
            )
        cin_g = int(w.shape[1])
        ksize = math.prod(int(k) for k in w.shape[2:])
        return _Block(
            ref=ref,
            dense=dense,
            shape=w.shape,
            shape4=(groups, out // groups, cin_g, ksize),
            fan_in=cin_g * ksize,
            dtype=w.dtype,
            device=w.device,
            one=torch.ones((), dtype=w.dtype, device=w.device),
        )

    def _refresh(self, block: _Block) -> None:
        """Recompute ``q``, ``s`` and the maps' coefficients from the layer's statistics.

        Three small ops per layer: ``s^2 = var + (eps1 max(var) + eps2)`` with ``max(var)``
        as a float (:meth:`~pyro_bnp.layers.RunningInputStats.var_max` has it from the update
        of the statistics), ``r = 1 / s`` and ``c = mu / s``; ``1 / q`` stays a float that
        the maps fold into their scalar factors.
        """
        stats = block.ref.stats
        mu, var = stats.mean, stats.var
        var_max = getattr(stats, "var_max", None)
        vmax = float(var_max()) if callable(var_max) else None
        if mu.dtype != block.dtype or mu.device != block.device or mu.requires_grad:
            mu = mu.detach().to(dtype=block.dtype, device=block.device)
        if var.dtype != block.dtype or var.device != block.device or var.requires_grad:
            var = var.detach().to(dtype=block.dtype, device=block.device)
        if vmax is None:
            vmax = float(var.max())
        s2 = torch.add(var, block.one, alpha=self.eps1 * vmax + self.eps2)
        q2 = balance_factor(block.fan_in, stats.batch_size, stats.spatial_size)
        prior = self._priors.get(block.ref.name)
        if self.prior_cap is not None and prior is not None and self._cap_eps is not None:
            s2, q2_t = self._capped(block, mu, s2, q2, prior, self._cap_eps, self.prior_cap)
            q2 = float(q2_t)
        q = math.sqrt(q2)
        r = s2.rsqrt()
        c = mu * r
        if not block.dense:
            g, _, cin_g, _ = block.shape4
            r = r.view(g, 1, cin_g, 1)
            c = c.view(g, 1, cin_g, 1)
        block.mu, block.s2, block.q, block.q2, block.iq = mu, s2, q, q2, 1.0 / q
        block.r, block.c, block.a, block.ca = r, c, None, None
        block.fresh = True

    @staticmethod
    def _capped(
        block: _Block,
        mu: Tensor,
        s2: Tensor,
        q2: float,
        prior: tuple[float | None, float],
        eps: float | Tensor,
        kappa: float,
    ) -> tuple[Tensor, Tensor]:
        """``(s^2, q^2)`` with the prior's stability number at most ``kappa`` (``prior_cap``).

        Tensor arithmetic only (``q^2`` a 0-d float64 tensor, the bound in float64), so the
        compiled update runs the same function with ``eps`` a graph input.
        """
        var_b, var_w = prior
        floor = eps / (2.0 * kappa * q2 * var_w)
        s2 = torch.clamp_min(s2, floor.to(s2.dtype) if isinstance(floor, Tensor) else floor)
        groups, _, cin_g, ksize = block.shape4
        v = s2.double().view(groups, cin_g)
        lam = (v.amin() * var_w).reciprocal()  # the diagonal's largest entry
        if var_b is not None and block.ref.bias is not None:
            # an upper bound of the arrowhead's largest eigenvalue: max(alpha, max r) + |v|
            m = mu.double().view(groups, cin_g)
            alpha = (1.0 + ksize * (m.square() / v).sum(1)) / var_b
            vnorm = (ksize * (m / v).square().sum(1) / (var_b * var_w)).sqrt()
            lam = torch.maximum(lam, (torch.maximum(alpha, lam) + vnorm).amax())
        nu = 0.5 * eps * lam / q2
        return s2, q2 * torch.clamp_min(nu / kappa, 1.0)

    @property
    def priors(self) -> dict[str, tuple[float | None, float]]:
        """Layer -> ``(bias prior variance or None, weight prior variance)`` registered."""
        return dict(self._priors)

    def set_priors(self, priors: Mapping[str, tuple[float | None, float]]) -> None:
        """Register the i.i.d. Normal prior variances ``(bias or None, weight)`` per layer.

        :meth:`bind` calls it with the priors the kernel's potential read from the model (for
        every model pattern); ``prior_cap`` and :meth:`warnings` use them.
        """
        self._priors = dict(priors)
        for block in self._blocks.values():
            block.fresh = False

    def _set_cap_step_size(self, step_size: float) -> None:
        """Recompute the capped blocks when the step size changed (``prior_cap`` only)."""
        if self.prior_cap is None or not self._priors or step_size == self._cap_eps:
            return
        self._cap_eps = step_size
        for name, block in self._blocks.items():
            if name in self._priors:
                block.fresh = False

    def _other_sites(self, values: Mapping[str, Tensor]) -> Params:
        """Return the entries of ``values`` for the sites outside the layers."""
        return {k: values[k] for k in self._other_names if k in values}

    def _ensure(self) -> None:
        for block in self._blocks.values():
            if not block.fresh:
                self._refresh(block)

    def update(self, grads: Mapping[str, Tensor], step_size: float | None = None) -> None:
        """Read the layers' current statistics and, with RMSprop, fold ``g_z`` into ``V``.

        Call it after the gradient evaluation that updated the statistics (the kernel does).
        When frozen, the preconditioner no longer changes (except that ``prior_cap`` follows
        ``step_size``).
        """
        if step_size is not None:
            self._set_cap_step_size(step_size)
        for block in self._blocks.values():
            if not (self.frozen and block.fresh):
                self._refresh(block)
        if self.others is not None:
            self.others.update(self._other_sites(grads))
        rms = self.rmsprop
        self._gz = None
        if rms is not None and not (rms.frozen and rms.diagonal()):
            gz = self._to_z_all(grads)
            rms.update(gz)
            self._gz = (grads, gz)  # step() maps the same gradient with the same statistics

    def freeze(self) -> None:
        """Freeze the layer statistics and the RMSprop state: ``M`` is constant from now on.

        ``M`` is derived once more, from the statistics being frozen (which include the batch
        of the last update's proposal), so it is a function of the saved state: a chain resumed
        from :meth:`state_dict` continues with the same ``M``.
        """
        super().freeze()
        for block in self._blocks.values():
            self._refresh(block)
        for block in self._blocks.values():
            block.ref.stats.frozen = True
        if self.rmsprop is not None:
            self.rmsprop.freeze()
        if self.others is not None:
            self.others.freeze()

    # -- the maps A^T = P^T / q and A = P / q, per layer ----------------------------------
    @staticmethod
    def _scaled(block: _Block) -> tuple[Tensor, Tensor]:
        """Return ``a = 1 / (q s)`` and ``c / q = mu / (q s)`` for the generic maps (cached)."""
        if block.a is None or block.ca is None:
            assert block.r is not None and block.c is not None
            block.a, block.ca = block.r * block.iq, block.c * block.iq
        return block.a, block.ca

    @staticmethod
    def _to_z(block: _Block, gw: Tensor, gb: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(P^T / q) g``: ``z_w = (g_w - g_b mu) / (q s)``, ``z_b = g_b / q``."""
        a, c = BNP._scaled(block)
        if block.dense:
            zw = gw * a
            if gb is None:
                return zw, None
            return torch.addr(zw, gb, c, alpha=-1.0), gb * block.iq
        g, out_g, _, _ = block.shape4
        zw4 = gw.reshape(block.shape4) * a
        if gb is None:
            return zw4.view(block.shape), None
        zw4 = zw4 - gb.view(g, out_g, 1, 1) * c
        return zw4.view(block.shape), gb * block.iq

    @staticmethod
    def _from_z(block: _Block, zw: Tensor, zb: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(P / q) z``: ``w = z_w / (q s)``, ``b = z_b / q - sum(z_w mu / (q s))``."""
        a, c = BNP._scaled(block)
        if block.dense:
            w = zw * a
            if zb is None:
                return w, None
            return w, torch.addmv(zb, zw, c, beta=block.iq, alpha=-1.0)
        zw4 = zw.reshape(block.shape4)
        w = (zw4 * a).view(block.shape)
        if zb is None:
            return w, None
        b = zb * block.iq - (zw4 * c).sum((2, 3)).reshape(zb.shape)
        return w, b

    @staticmethod
    def _bias_dot(
        block: _Block, b: Tensor, u4: Tensor, c: Tensor, beta: float, alpha: float
    ) -> Tensor:
        """Conv: ``beta b + alpha sum_{p,k} u[o, p, k] c[p]`` per output channel ``o``.

        Summing over the kernel positions first keeps weight-sized temporaries out.
        """
        g, out_g, cin_g, _ = block.shape4
        out = torch.baddbmm(
            b.reshape(g, out_g, 1), u4.sum(3), c.view(g, cin_g, 1), beta=beta, alpha=alpha
        )
        return out.view(b.shape)

    def _map_all(self, values: Mapping[str, Tensor], to_z: bool) -> Params:
        out = dict(values)
        fn = self._to_z if to_z else self._from_z
        for block in self._blocks.values():
            ref = block.ref
            if ref.weight not in values:
                continue
            w, b = fn(block, values[ref.weight], None if ref.bias is None else values[ref.bias])
            out[ref.weight] = w
            if ref.bias is not None and b is not None:
                out[ref.bias] = b
        return out

    def _to_z_all(self, grads: Mapping[str, Tensor]) -> Params:
        self._ensure()
        return self._map_all(grads, to_z=True)

    def _from_z_all(self, z: Mapping[str, Tensor]) -> Params:
        self._ensure()
        return self._map_all(z, to_z=False)

    # -- the protocol's maps and fused parts ---------------------------------------------
    def apply_at(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``A^T g``: ``(P/q)^T g`` on layers (then ``sqrt(G_z)`` with RMSprop)."""
        gz = self._to_z_all(grads)
        if self.rmsprop is not None:
            return self.rmsprop.apply_at(gz)
        if self.others is not None:
            gz.update(self.others.apply_at(self._other_sites(grads)))
        return gz

    def apply_a(self, u: Mapping[str, Tensor]) -> Params:
        """Return ``A u``: ``(P/q) u`` on layers (``(P/q) sqrt(G_z) u`` with RMSprop)."""
        z = dict(u) if self.rmsprop is None else self.rmsprop.apply_a(u)
        out = self._from_z_all(z)
        if self.others is not None:
            out.update(self.others.apply_a(self._other_sites(u)))
        return out

    def _fresh_layers(
        self, present: Mapping[str, Tensor]
    ) -> Iterator[tuple[_Block, str, str | None, Tensor, Tensor]]:
        """Yield the layers whose weight is in ``present``: block (refreshed), sites, r, c."""
        for block in self._blocks.values():
            wname = block.ref.weight
            if wname not in present:
                continue
            if not block.fresh:
                self._refresh(block)
            assert block.r is not None and block.c is not None
            yield block, wname, block.ref.bias, block.r, block.c

    def noise_minus_drift(
        self, xi: Mapping[str, Tensor], grads: Mapping[str, Tensor], k: float
    ) -> Params:
        """Return ``u = xi - k A^T g``, into ``xi``'s tensors.

        Per dense layer, with ``r = 1 / s`` and ``c = mu / s``: ``u_w = xi_w - (k/q) r g_w +
        (k/q) g_b c^T`` (two ``addcmul_``) and ``u_b = xi_b - (k/q) g_b``; convolutions do the
        same on the ``[G, out/G, in/G, k]`` view. With RMSprop, ``u = xi - k sqrt(G_z) g_z``
        with the ``g_z = (P/q)^T g`` that :meth:`update` computed for ``V``.
        """
        rms = self.rmsprop
        if rms is not None:
            cached, self._gz = self._gz, None
            gz = cached[1] if cached is not None and cached[0] is grads else self._to_z_all(grads)
            return rms.noise_minus_drift(xi, gz, k)
        out: Params = {}
        for block, wname, bname, r, c in self._fresh_layers(xi):
            kq = k * block.iq
            uw, gw = xi[wname], grads[wname]
            gb = None if bname is None else grads[bname]
            if block.dense:
                uw.addcmul_(gw, r, value=-kq)
                if gb is not None:  # (``addr_`` would build the outer product in a temporary)
                    uw.addcmul_(gb.unsqueeze(1), c, value=kq)
            else:
                g, out_g, _, _ = block.shape4
                uw4 = uw.view(block.shape4)  # a fresh contiguous tensor
                uw4.addcmul_(gw.reshape(block.shape4), r, value=-kq)
                if gb is not None:
                    uw4.addcmul_(gb.view(g, out_g, 1, 1), c, value=kq)
            out[wname] = uw
            if bname is not None and gb is not None:
                out[bname] = xi[bname].add_(gb, alpha=-kq)
        if self.others is not None:
            out.update(self.others.noise_minus_drift(self._other_sites(xi), grads, k))
        for name, x in xi.items():
            if name not in out:
                out[name] = x.sub_(grads[name], alpha=k)
        return out

    def move(self, params: Mapping[str, Tensor], u: Mapping[str, Tensor], scale: float) -> Params:
        """Return ``theta + scale A u``, into ``u``'s tensors (no weight-sized allocation).

        Per dense layer: ``b' = b - (scale/q) u_w c + (scale/q) u_b`` (one ``addmv``, read
        before ``u_w`` is overwritten) and ``w' = w + (scale/q) r u_w`` (``addcmul``).
        """
        if self.rmsprop is not None:
            u = self.rmsprop.apply_a(u)  # sqrt(G_z) u, in place
        out: Params = {}
        for block, wname, bname, r, c in self._fresh_layers(params):
            sq = scale * block.iq
            uw, w = u[wname], params[wname]
            uw4 = uw if block.dense else uw.view(block.shape4)
            if bname is not None:
                b = params[bname]
                if block.dense:
                    nb = torch.addmv(b, uw, c, alpha=-sq)
                else:
                    nb = self._bias_dot(block, b, uw4, c, 1.0, -sq)
                out[bname] = nb.add_(u[bname], alpha=sq)
            w4 = w if block.dense else w.reshape(block.shape4)
            torch.addcmul(w4, uw4, r, value=sq, out=uw4)
            out[wname] = uw
        if self.others is not None and self.rmsprop is None:
            out.update(self.others.move(self._other_sites(params), u, scale))
        return {
            name: out[name] if name in out else torch.add(v, u[name], alpha=scale, out=u[name])
            for name, v in params.items()
        }

    def health(self) -> dict[str, str]:
        """Layers with non-finite statistics; the inner RMSprop's and ``others``' problems."""
        out: dict[str, str] = {}
        for block in self._blocks.values():
            stats = block.ref.stats
            if not (
                bool(torch.isfinite(stats.mean).all()) and bool(torch.isfinite(stats.var).all())
            ):
                out[block.ref.weight] = (
                    f"BNP's input statistics of layer {block.ref.name!r} are not finite"
                )
        for inner in (self.rmsprop, self.others):
            if inner is not None:
                out.update(inner.health())
        return out

    def advice(self, site: str) -> str:
        """Sites outside the layers get the identity under plain BNP: suggest ``others``."""
        in_layer = any(site in (b.ref.weight, b.ref.bias) for b in self._blocks.values())
        if not in_layer and self.rmsprop is None and self.others is None:
            return (
                "plain BNP gives sites outside the network's layers the identity (their raw "
                "curvature sets the step): BNP(others='rmsprop') or preconditioner='bnp-others' "
                "preconditions them"
            )
        inner = self.others if not in_layer else self.rmsprop
        return "" if inner is None else inner.advice(site)

    def warnings(self, step_size: float) -> dict[str, Warning]:
        """No layer found; or a layer whose Gaussian prior BNP's ``M`` makes unstable.

        The second: plain BNP without ``prior_cap`` only, for layers with i.i.d. Normal
        priors, when ``nu = (eps/2) lambda_max(M Lambda_prior) > 2`` (:meth:`prior_stability`).
        """
        out: dict[str, Warning] = {}
        if self._bound_without_layers:
            acts = "RMSprop" if self.rmsprop is not None or self.others is not None else None
            out["no-layers"] = UserWarning(
                f"{self!r} found no Linear/Conv layer whose weight is a latent site (pass "
                "modules= for a plain-function model); it acts as " + (acts or "the identity")
            )
        if not self._checks_priors():
            return out
        suggestion = suggest_step_size(step_size, self.stable_step_size(step_size))
        for name, nu in self.prior_stability(step_size, self._priors).items():
            if nu > 2.0:
                out[f"prior:{name}"] = RuntimeWarning(
                    f"BNP layer {name!r}: (eps/2) lambda_max(M Lambda_prior) = {nu:.3g} > 2 at "
                    f"step size {step_size:.3g}: the prior alone makes this layer's update "
                    "overshoot and grow (the chain oscillates or explodes); use a step size "
                    f"below {2.0 * step_size / nu:.2g} (e.g. {suggestion:.2g}), "
                    "BNP(prior_cap=1.0), or preconditioner='bnp+rmsprop'"
                )
        return out

    def _checks_priors(self) -> bool:
        """Whether the prior bound applies: plain BNP, no cap, layers with Normal priors.

        With RMSprop ``M``'s scale follows the gradients; the cap keeps ``nu`` small.
        """
        return self.rmsprop is None and self.prior_cap is None and bool(self._priors)

    def stable_step_size(self, step_size: float) -> float:
        """``min`` over layers of ``2 eps / nu``, the prior's stability bound (``inf`` if none).

        Only where :meth:`warnings` checks the priors (plain BNP, no ``prior_cap``) and the
        layer statistics are finite.
        """
        if not self._checks_priors():
            return math.inf
        try:
            nus = self.prior_stability(step_size, self._priors).values()
        except (RuntimeError, ValueError):  # statistics not finite: no bound to offer
            return math.inf
        bounds = [2.0 * step_size / nu for nu in nus if nu > 0.0 and math.isfinite(nu)]
        return min(bounds, default=math.inf)

    # -- inspection --------------------------------------------------------------------
    def dense_matrix(self, layer_name: str, neuron: int) -> Tensor:
        """Explicit ``M`` for one output neuron's block ``[b; vec(w)]`` (for tests).

        Parameters
        ----------
        layer_name : str
            :attr:`LayerRef.name` of the layer.
        neuron : int
            Output neuron (dense) or output channel (conv).

        Returns
        -------
        Tensor
            ``(1/q^2) P G_z P^T`` (``G_z = I`` without RMSprop) of size ``1 + fan_in``, or
            ``fan_in`` for a layer without bias, in the weight's dtype.
        """
        self._ensure()
        block = self._blocks[layer_name]
        assert block.mu is not None and block.s2 is not None
        ref = block.ref
        groups, out_g, cin_g, ksize = block.shape4
        grp = neuron // out_g
        chans = slice(grp * cin_g, (grp + 1) * cin_g)
        mu = block.mu[chans].repeat_interleave(ksize)
        s = block.s2[chans].sqrt().repeat_interleave(ksize)
        n = block.fan_in
        if ref.bias is None:
            p = torch.diag(1.0 / s)
        else:
            p = torch.zeros(n + 1, n + 1, dtype=block.dtype, device=block.device)
            p[0, 0] = 1.0
            p[0, 1:] = -mu / s
            p[1:, 1:] = torch.diag(1.0 / s)
        gz = torch.ones(p.shape[0], dtype=block.dtype, device=block.device)
        if self.rmsprop is not None:
            diag = self.rmsprop.diagonal()
            gw = diag[ref.weight][neuron].reshape(-1)
            gz = gw if ref.bias is None else torch.cat([diag[ref.bias][neuron].reshape(1), gw])
        return (p * gz) @ p.T / block.q2

    def layer_summary(self) -> dict[str, dict[str, Any]]:
        """Per layer: ``mu``, ``s2`` and ``q2`` as currently used by the preconditioner."""
        self._ensure()
        out: dict[str, dict[str, Any]] = {}
        for name, block in self._blocks.items():
            assert block.mu is not None and block.s2 is not None
            out[name] = {"mu": block.mu.clone(), "s2": block.s2.clone(), "q2": block.q2}
        return out

    def prior_stability(
        self, step_size: float, priors: Mapping[str, tuple[float | None, float]]
    ) -> dict[str, float]:
        r"""Per layer: ``nu = (eps/2) lambda_max(A^T Lambda A)`` of the Gaussian prior alone.

        ``Lambda = diag(1/sigma_b^2, 1/sigma_w^2 I)`` is the precision of i.i.d. Normal priors
        on a neuron's ``[b_i; w_i]`` and ``A = P / q`` BNP's map (RMSprop, if any, is left
        out). The prior's part of the update is a linear map with eigenvalues ``1 - nu_k``:
        with ``nu > 2`` it overshoots and grows, whatever the data say. BNP raises ``M`` in
        the directions of low-variance inputs (up to ``1 / (eps1 max(var))``), while the
        prior's curvature does not shrink there: in the final layer of a ResNet this made
        ``nu`` 3.9 at a step size fine for every other layer. Exact: the largest root of the
        arrowhead matrix's secular equation, bracketed in ``[L, L + |v|]``, by bisection.

        Parameters
        ----------
        step_size : float
            ``eps``.
        priors : Mapping[str, tuple[float | None, float]]
            Layer name -> (bias prior variance or None, weight prior variance); layers not
            named are skipped.

        Returns
        -------
        dict[str, float]
            Layer name -> ``nu``.
        """
        self._ensure()
        out: dict[str, float] = {}
        for name, block in self._blocks.items():
            if name not in priors:
                continue
            var_b, var_w = priors[name]
            assert block.mu is not None and block.s2 is not None
            groups, _, cin_g, ksize = block.shape4
            mu = block.mu.detach().double().view(groups, cin_g)
            s2 = block.s2.detach().double().view(groups, cin_g)
            r = 1.0 / (s2 * var_w)  # the diagonal, per input channel
            worst = float(r.max())
            if var_b is not None and block.ref.bias is not None:
                # per group: alpha = (1 + k sum mu^2 / s^2) / var_b,
                # v_j = mu_j / s_j^2 / sqrt(var_b var_w), counted k times (kernel positions)
                alpha = (1.0 + ksize * (mu.square() / s2).sum(1)) / var_b
                v2 = ksize * (mu / s2).square() / (var_b * var_w)
                for g in range(groups):
                    worst = max(worst, _arrowhead_max(float(alpha[g]), v2[g], r[g]))
            out[name] = 0.5 * step_size * worst / block.q2
        return out

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State including each layer's statistics and the RMSprop state (tensors cloned)."""
        state = super().state_dict()
        layers: dict[str, Any] = {}
        for name, block in self._blocks.items():
            stats: Any = block.ref.stats
            if hasattr(stats, "state_dict"):
                layers[name] = stats.state_dict()
            else:
                layers[name] = {
                    "mean": stats.mean.clone(),
                    "var": stats.var.clone(),
                    "batch_size": int(stats.batch_size),
                    "spatial_size": int(stats.spatial_size),
                    "frozen": bool(stats.frozen),
                }
        state["layers"] = layers
        state["rmsprop"] = None if self.rmsprop is None else self.rmsprop.state_dict()
        state["others"] = None if self.others is None else self.others.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (call :meth:`init` with the same layers first).

        Raises
        ------
        ValueError
            If the saved layers are not the registered ones, or RMSprop state is missing.
        """
        saved = state["layers"]
        if set(saved) != set(self._blocks):
            raise ValueError(
                f"BNP: load_state_dict: saved layers {sorted(saved)} do not match the "
                f"registered layers {sorted(self._blocks)}"
            )
        if (state.get("rmsprop") is None) != (self.rmsprop is None):
            raise ValueError("BNP: load_state_dict: rmsprop state does not match this object")
        if (state.get("others") is None) != (self.others is None):
            raise ValueError("BNP: load_state_dict: others state does not match this object")
        super().load_state_dict(state)
        for name, block in self._blocks.items():
            stats: Any = block.ref.stats
            s = saved[name]
            if hasattr(stats, "load_state_dict"):
                stats.load_state_dict(s)
            else:
                stats.mean = s["mean"].clone()
                stats.var = s["var"].clone()
                stats.batch_size = int(s["batch_size"])
                stats.spatial_size = int(s["spatial_size"])
                stats.frozen = bool(s["frozen"])
            block.fresh = False
        if self.rmsprop is not None:
            self.rmsprop.load_state_dict(state["rmsprop"])
        if self.others is not None:
            self.others.load_state_dict(state["others"])

    def config(self) -> dict[str, Any]:
        """Hyperparameters (flat scalars; RMSprop's as ``rmsprop_alpha``, ``rmsprop_eps``)."""
        cfg: dict[str, Any] = {
            "rho": self.rho,
            "eps1": self.eps1,
            "eps2": self.eps2,
            "freeze_after_warmup": self.freeze_after_warmup,
            "init": self.stats_init,
        }
        if self.prior_cap is not None:
            cfg["prior_cap"] = self.prior_cap
        if self.rmsprop is not None:
            cfg.update({f"rmsprop_{k}": v for k, v in self.rmsprop.config().items()})
        if self.others is not None:
            cfg["others"] = "rmsprop"
            cfg.update({f"others_{k}": v for k, v in self.others.config().items()})
        return cfg

    def __repr__(self) -> str:
        return (
            f"BNP(rho={self.rho!r}, eps1={self.eps1!r}, eps2={self.eps2!r}, "
            f"freeze_after_warmup={self.freeze_after_warmup!r}, rmsprop={self.rmsprop!r}, "
            f"init={self.stats_init!r}, prior_cap={self.prior_cap!r}, "
            f"others={'identity' if self.others is None else self.others!r})"
        )

r"""Preconditioners for stochastic gradient Langevin dynamics (pure torch).

Every preconditioner here is ONE object that gives both halves of the SGLD update, so the
drift and the noise can never disagree (the BlackJAX ``metrics`` habit):

.. math::

    \theta \leftarrow \theta - \frac{\epsilon}{2} M \nabla \hat U(\theta)
        + \sqrt{\epsilon T}\, A \xi, \qquad M = A A^\top, \quad \xi \sim N(0, I).

* :meth:`Preconditioner.drift` returns ``M g``;
* :meth:`Preconditioner.noise` returns ``A xi``;
* :meth:`Preconditioner.update` adapts the state from the current gradient (RMSprop) or
  from layer statistics (BNP), unless the preconditioner is :meth:`frozen <freeze>`.

This module never imports pyro: it works on ``dict[str, Tensor]`` keyed by site name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
_TINY = float(torch.finfo(torch.float32).tiny)

__all__ = [
    "Identity",
    "InputStatistics",
    "LayerRef",
    "Params",
    "Preconditioner",
    "RMSprop",
    "standard_normal_like",
]


def standard_normal_like(
    params: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> Params:
    """Draw ``xi ~ N(0, I)`` shaped like ``params``, site by site in sorted name order.

    The order is part of the contract: it makes a chain reproducible from its generator.
    """
    return {
        k: torch.randn(
            params[k].shape, generator=generator, dtype=params[k].dtype, device=params[k].device
        )
        for k in sorted(params)
    }


class InputStatistics(Protocol):
    """Running statistics of a layer's input, as BNP needs them (see :mod:`pyro_bnp.layers`).

    Attributes
    ----------
    mean : Tensor
        Running mean per input feature (dense) or input channel (conv), shape ``[in]``.
    var : Tensor
        Running biased variance, same shape.
    batch_size : int
        Rows of the last mini-batch seen (``N`` in the paper's ``q^2``).
    spatial_size : int
        ``H * W`` of the input feature map (1 for dense layers).
    frozen : bool
        When true the statistics are no longer updated.
    """

    mean: Tensor
    var: Tensor
    batch_size: int
    spatial_size: int
    frozen: bool


@dataclass
class LayerRef:
    """A network layer whose weight (and bias) are sample sites.

    Parameters
    ----------
    name : str
        The module's path in the network, e.g. ``"fc1"`` or ``"net.0"``.
    kind : str
        ``"linear"`` or ``"conv"``.
    weight : str
        Site name of the weight, shape ``[out, in]`` or ``[out, in/groups, *kernel]``.
    bias : str or None
        Site name of the bias, shape ``[out]``, or None for a layer without bias.
    stats : InputStatistics
        Statistics of the layer's input.
    groups : int
        Convolution groups (1 for dense layers).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    stats: InputStatistics
    groups: int = 1


class Preconditioner:
    """Base class: the identity preconditioner ``M = A = I`` with the shared SGLD step.

    Subclasses override :meth:`init`, :meth:`update`, :meth:`drift` and :meth:`noise`
    (and may override :meth:`step` with a fused version that gives the same numbers).
    """

    #: short name recorded in exports and progress bars
    name = "identity"
    #: the kernel calls :meth:`freeze` at the end of warmup when this is true
    freeze_after_warmup = False
    #: the kernel finds network layers and passes them to :meth:`init` when this is true
    needs_layers = False

    def __init__(self) -> None:
        self.frozen = False
        self.num_data = 1.0

    # -- life cycle --------------------------------------------------------------------
    def init(
        self,
        params: Mapping[str, Tensor],
        *,
        num_data: float = 1.0,
        layers: tuple[LayerRef, ...] = (),
    ) -> None:
        """Reset all state for a new chain.

        Parameters
        ----------
        params : Mapping[str, Tensor]
            The chain's initial unconstrained parameters (shapes and dtypes are taken).
        num_data : float
            Number of observations ``N`` in the full data set (used by RMSprop's
            per-datum convention).
        layers : tuple of LayerRef
            Network layers whose weight/bias are sites (used by BNP; ignored here).
        """
        self.frozen = False
        self.num_data = float(num_data)

    def update(self, grads: Mapping[str, Tensor]) -> None:
        """Adapt the state to the current gradient of ``U_hat`` (no-op for the identity)."""

    def freeze(self) -> None:
        """Stop adapting: from now on ``M`` is constant and the chain is an exact SGLD."""
        self.frozen = True

    # -- the two halves of the update --------------------------------------------------
    def drift(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``M g`` for every site."""
        return dict(grads)

    def noise(self, xi: Mapping[str, Tensor]) -> Params:
        """Return ``A xi`` for standard normal ``xi``; ``Cov(A xi) = M``.

        The returned tensors must be ``xi``'s own or new ones (never state): :meth:`step`
        writes the new position into them.
        """
        return dict(xi)

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        step_size: float,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Params:
        """One SGLD move ``(theta + sqrt(eps T) A xi) - (eps/2) M g`` (new tensors).

        The noise ``xi`` is drawn site by site in sorted name order from ``generator``
        (``torch.randn``); with ``temperature == 0`` no noise is drawn at all.
        """
        drift = self.drift(grads)
        half = 0.5 * step_size
        if temperature > 0:
            xi = standard_normal_like(params, generator)
            noise = self.noise(xi)  # fresh tensors: the new state is written into them
            scale = math.sqrt(step_size * temperature)
            out = {}
            for k, v in params.items():
                a = noise[k]
                if scale < _TINY:  # alpha= must be representable in float32
                    a.mul_(scale).add_(v)
                else:
                    torch.add(v, a, alpha=scale, out=a)
                out[k] = a.add_(drift[k], alpha=-half)
            return out
        return {k: torch.add(v, drift[k], alpha=-half) for k, v in params.items()}

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chain exactly (tensors are cloned)."""
        return {"frozen": self.frozen, "num_data": self.num_data}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.frozen = bool(state["frozen"])
        self.num_data = float(state["num_data"])

    def config(self) -> dict[str, Any]:
        """Hyperparameters, for export attributes and ``repr``."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Identity(Preconditioner):
    """No preconditioning: plain SGLD (Welling & Teh 2011), ``M = A = I``."""

    name = "identity"


class RMSprop(Preconditioner):
    r"""RMSprop preconditioning: pSGLD (Li, Chen, Carlson, Carin 2016).

    .. math::

        V \leftarrow \alpha V + (1 - \alpha)\, \bar g \odot \bar g, \qquad
        G = 1 / (\lambda + \sqrt{V}), \qquad M = \mathrm{diag}(G), \quad A = \mathrm{diag}(\sqrt G)

    with the *per-datum* gradient ``g_bar = grad U_hat / N`` (``N`` the number of observations),
    as the pSGLD reference code does on a mean loss. ``V`` is initialised from the first
    gradient (not zero). The divergence term ``Gamma`` of the paper is dropped, as is usual.

    Warnings
    --------
    Other libraries square the full gradient of ``U`` instead of the per-datum one; that moves
    useful step sizes by orders of magnitude. With our convention a pSGLD learning rate ``lr`` on
    a mean loss corresponds to ``step_size = 2 * lr / N`` here.

    Parameters
    ----------
    alpha : float
        Decay of the squared-gradient average, in ``[0, 1)``.
    eps : float
        ``lambda``, added to ``sqrt(V)``; must be positive.
    freeze_after_warmup : bool
        Freeze ``V`` at the end of warmup (the kernel calls :meth:`freeze`): the sampling
        phase is then an exact SGLD with a constant diagonal ``M``.
    """

    name = "rmsprop"

    def __init__(
        self, alpha: float = 0.99, eps: float = 1e-5, freeze_after_warmup: bool = False
    ) -> None:
        super().__init__()
        self.freeze_after_warmup = bool(freeze_after_warmup)
        if not (0.0 <= alpha < 1.0) or not math.isfinite(alpha):
            raise ValueError(f"RMSprop: alpha must be in [0, 1), got {alpha!r}")
        if not (eps > 0.0) or not math.isfinite(eps):
            raise ValueError(f"RMSprop: eps must be positive and finite, got {eps!r}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.v: Params = {}
        self._g: Params = {}
        self._root: Params = {}  # sqrt(G)
        self._scratch: Params = {}  # per-datum gradient buffers

    def init(
        self,
        params: Mapping[str, Tensor],
        *,
        num_data: float = 1.0,
        layers: tuple[LayerRef, ...] = (),
    ) -> None:
        """Reset ``V`` (it is set from the first gradient)."""
        super().init(params, num_data=num_data, layers=layers)
        self.v = {}
        self._g, self._root, self._scratch = {}, {}, {}

    def update(self, grads: Mapping[str, Tensor]) -> None:
        """Fold the current per-datum squared gradient into ``V`` and refresh ``G``."""
        if self.frozen and self._g:
            return
        inv_n = 1.0 / self.num_data
        for k, g in grads.items():
            v = self.v.get(k)
            if v is None:
                self.v[k] = (g * inv_n).square_()
                continue
            gn = self._scratch.get(k)
            if gn is None:
                gn = self._scratch[k] = torch.empty_like(g)
            torch.mul(g, inv_n, out=gn)  # scaled before squaring: no overflow of g^2
            v.mul_(self.alpha).addcmul_(gn, gn, value=1.0 - self.alpha)
        self._refresh()

    def _refresh(self) -> None:
        """``G = 1 / (lambda + sqrt(V))`` and ``sqrt(G)``, into buffers kept between steps."""
        for k, v in self.v.items():
            g = self._g.get(k)
            if g is None or g.shape != v.shape:
                g = self._g[k] = torch.empty_like(v)
                self._root[k] = torch.empty_like(v)
            torch.sqrt(v, out=g).add_(self.eps).reciprocal_()
            torch.sqrt(g, out=self._root[k])

    def diagonal(self) -> Params:
        """Return the current diagonal ``G`` of ``M`` per site (updated in place)."""
        return self._g

    def drift(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``G * g``."""
        return {k: g * self._g[k] for k, g in grads.items()}

    def noise(self, xi: Mapping[str, Tensor]) -> Params:
        """Return ``sqrt(G) * xi``."""
        return {k: x * self._root[k] for k, x in xi.items()}

    def noise_minus_drift(
        self, xi: Mapping[str, Tensor], grads: Mapping[str, Tensor], k: float
    ) -> Params:
        """Return ``sqrt(G) xi - k G g``, written into ``xi``'s (fresh) tensors."""
        return {
            n: x.mul_(self._root[n]).addcmul_(grads[n], self._g[n], value=-k) for n, x in xi.items()
        }

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        step_size: float,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Params:
        """:meth:`Preconditioner.step`, fused: ``(theta + s sqrt(G) xi) - (eps/2) G g``.

        Written into the fresh noise tensors, without a temporary for ``G g``.
        """
        scale = math.sqrt(step_size * temperature)
        if not scale >= _TINY:  # T = 0, or alpha= not representable in float32
            return super().step(params, grads, step_size, temperature, generator)
        half = 0.5 * step_size
        xi = standard_normal_like(params, generator)
        out = {}
        for k, v in params.items():
            a = xi[k].mul_(self._root[k])
            torch.add(v, a, alpha=scale, out=a)
            out[k] = a.addcmul_(grads[k], self._g[k], value=-half)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Include ``V``."""
        state = super().state_dict()
        state["v"] = {k: v.clone() for k, v in self.v.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``V`` and recompute ``G``."""
        super().load_state_dict(state)
        self.v = {k: v.clone() for k, v in state["v"].items()}
        self._g, self._root = {}, {}
        self._refresh()

    def config(self) -> dict[str, Any]:
        """Return ``alpha`` and ``eps``."""
        return {
            "alpha": self.alpha,
            "eps": self.eps,
            "freeze_after_warmup": self.freeze_after_warmup,
        }

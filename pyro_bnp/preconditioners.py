r"""Preconditioners for stochastic gradient Langevin dynamics (pure torch).

Every preconditioner here is ONE object that gives both halves of the SGLD update, so the
drift and the noise can never disagree (the BlackJAX ``metrics`` habit):

.. math::

    \theta \leftarrow \theta - \frac{\epsilon}{2} M \nabla \hat U(\theta)
        + \sqrt{\epsilon T}\, A \xi, \qquad M = A A^\top, \quad \xi \sim N(0, I).

* :meth:`Preconditioner.apply_at` gives ``A^T g`` and :meth:`Preconditioner.apply_a` gives
  ``A u``; the integrator (:func:`pyro_bnp.integrators.sgld_step`) combines them, through the
  fused parts :meth:`Preconditioner.noise_minus_drift` and :meth:`Preconditioner.move`;
* :meth:`Preconditioner.update` adapts the state from the current gradient (RMSprop) or
  from layer statistics (BNP), unless the preconditioner is :meth:`frozen <freeze>`.

The protocol is written down on :class:`Preconditioner`; docs/design.md shows how to add one.

This module never imports pyro: it works on ``dict[str, Tensor]`` keyed by site name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
_TINY = float(torch.finfo(torch.float32).tiny)

__all__ = [
    "BindContext",
    "Identity",
    "InputStatistics",
    "LayerRef",
    "NormalPrior",
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


@dataclass(frozen=True)
class NormalPrior:
    """A fixed i.i.d. Normal prior of one site: every entry ``~ N(loc, var)``.

    Read from the model's set-up trace by :class:`pyro_bnp.potential.MinibatchPotential` for
    every latent site whose prior is such a Normal (constant ``loc`` and ``scale``, on the
    unconstrained space itself), whatever the model pattern.
    """

    loc: float
    var: float


@dataclass(frozen=True)
class BindContext:
    """What a preconditioner learns about the chain it serves (:meth:`Preconditioner.bind`).

    Parameters
    ----------
    params : Mapping[str, Tensor]
        The chain's initial unconstrained parameters (shapes, dtypes, devices are taken).
    num_data : float
        Number of observations ``N`` of the full data set (RMSprop's per-datum convention).
    layers : tuple of LayerRef
        Network layers whose weight (and bias) are sites, with their input statistics; empty
        unless :meth:`Preconditioner.layer_options` asked for them.
    priors : Mapping[str, NormalPrior]
        Sites with a fixed i.i.d. Normal prior (others are absent).
    """

    params: Mapping[str, Tensor]
    num_data: float = 1.0
    layers: tuple[LayerRef, ...] = ()
    priors: Mapping[str, NormalPrior] = field(default_factory=dict)


class Preconditioner:
    r"""Base class and written protocol of a preconditioner ``M = A A^T``; itself ``M = I``.

    An integrator (:func:`pyro_bnp.integrators.sgld_step`) writes the update once, as

    .. math::

        \theta' = \theta + s\, A\,(\xi - k\, A^\top g), \qquad
        s = \sqrt{\epsilon T},\ k = \frac{\epsilon}{2 s},

    which is ``theta - (eps/2) M g + sqrt(eps T) A xi``, and asks the preconditioner for the
    parts. The kernels call only the methods declared here:

    * life cycle: :meth:`layer_options` (does it want network layers?), :meth:`bind` (a new
      chain), :meth:`update` (adapt before a step), :meth:`freeze` and
      :attr:`freeze_after_warmup`, :meth:`warnings` (messages for the user);
    * the maps: :meth:`apply_at` (``A^T g``) and :meth:`apply_a` (``A u``); a new
      preconditioner needs only these two (and :meth:`update` if it adapts);
    * the fused parts, derived from the maps here and overridden for speed:
      :meth:`noise_minus_drift` (``xi - k A^T g`` written into the noise buffer) and
      :meth:`move` (``theta + s A u`` written into ``u``);
    * state: :meth:`state_dict`, :meth:`load_state_dict`, :meth:`config`.

    :meth:`drift` (``M g``), :meth:`noise` (``A xi``) and :meth:`step` (one SGLD move) are
    derived from the same parts, so drift and noise can never disagree.
    """

    #: short name recorded in exports and progress bars
    name = "identity"
    #: the kernel calls :meth:`freeze` at the end of warmup when this is true
    freeze_after_warmup = False

    def __init__(self) -> None:
        self.frozen = False
        self.num_data = 1.0

    # -- life cycle --------------------------------------------------------------------
    def layer_options(self) -> dict[str, Any] | None:
        """Keyword arguments for :func:`pyro_bnp.layers.find_layers`, or None (no layers).

        A preconditioner that returns a dict gets the network's layers and their input
        statistics in :attr:`BindContext.layers`.
        """
        return None

    @property
    def needs_layers(self) -> bool:
        """Whether :meth:`layer_options` asks for network layers."""
        return self.layer_options() is not None

    def bind(self, context: BindContext) -> None:
        """Reset all state for a new chain described by ``context``."""
        self.frozen = False
        self.num_data = float(context.num_data)

    def init(
        self,
        params: Mapping[str, Tensor],
        *,
        num_data: float = 1.0,
        layers: tuple[LayerRef, ...] = (),
    ) -> None:
        """Reset all state for a new chain: :meth:`bind` without priors.

        Parameters
        ----------
        params : Mapping[str, Tensor]
            The chain's initial unconstrained parameters (shapes and dtypes are taken).
        num_data : float
            Number of observations ``N`` in the full data set.
        layers : tuple of LayerRef
            Network layers whose weight/bias are sites (used by BNP).
        """
        self.bind(BindContext(params, float(num_data), tuple(layers)))

    def update(self, grads: Mapping[str, Tensor], step_size: float | None = None) -> None:
        """Adapt to the gradient of ``U_hat`` before a step of size ``step_size``.

        The identity has nothing to adapt. ``step_size`` is the one the next step uses (None:
        not known, e.g. a direct call).
        """

    def freeze(self) -> None:
        """Stop adapting: from now on ``M`` is constant and the chain is an exact SGLD."""
        self.frozen = True

    def warnings(self, step_size: float) -> dict[str, Warning]:
        """Warnings the user should see at this step size, keyed so each is shown once.

        The kernel calls it at the first update and at the end of warmup and shows every key
        once per kernel.
        """
        return {}

    def stable_step_size(self, step_size: float) -> float:
        """Return the largest step size the preconditioner's state calls stable (inf: no bound).

        The kernel suggests half of it where that is below a tenth of the current step size
        (:func:`pyro_bnp.chain.suggest_step_size`), in every warning and error of the run.
        """
        return math.inf

    def health(self) -> dict[str, str]:
        """Sites whose preconditioner state is broken (not finite, or ``M = 0``) -> the problem.

        The kernel's chain-health checks (:class:`pyro_bnp.chain.Health`) report them by name.
        """
        return {}

    def advice(self, site: str) -> str:
        """Return a remedy to suggest when ``site`` runs away under this preconditioner, or ""."""
        return ""

    # -- the maps ----------------------------------------------------------------------
    def apply_at(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``A^T g`` per site (may return ``grads``' own tensors: do not modify them)."""
        return dict(grads)

    def apply_a(self, u: Mapping[str, Tensor]) -> Params:
        """Return ``A u`` per site; may overwrite ``u``'s tensors (the caller owns them)."""
        return dict(u)

    # -- the fused parts ---------------------------------------------------------------
    def noise_minus_drift(
        self, xi: Mapping[str, Tensor], grads: Mapping[str, Tensor], k: float
    ) -> Params:
        """Return ``u = xi - k A^T g``, written into ``xi``'s tensors (fresh noise)."""
        at = self.apply_at(grads)
        return {n: x.sub_(at[n], alpha=k) for n, x in xi.items()}

    def move(self, params: Mapping[str, Tensor], u: Mapping[str, Tensor], scale: float) -> Params:
        """Return ``theta + scale A u``, written into ``u``'s tensors (``theta`` is kept)."""
        au = self.apply_a(u)
        return {n: torch.add(v, au[n], alpha=scale, out=au[n]) for n, v in params.items()}

    # -- derived -----------------------------------------------------------------------
    def drift(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``M g = A (A^T g)`` for every site."""
        return self.apply_a({n: v.clone() for n, v in self.apply_at(grads).items()})

    def noise(self, xi: Mapping[str, Tensor]) -> Params:
        """Return ``A xi`` for standard normal ``xi``; ``Cov(A xi) = M`` (``xi`` is kept)."""
        return self.apply_a({n: v.clone() for n, v in xi.items()})

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        step_size: float,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Params:
        """One SGLD move: :func:`pyro_bnp.integrators.sgld_step` with this preconditioner.

        The noise ``xi`` is drawn site by site in sorted name order from ``generator``
        (``torch.randn``); with ``temperature == 0`` no noise is drawn at all.
        """
        from pyro_bnp.integrators import sgld_step

        return sgld_step(self, params, grads, step_size, temperature, generator)

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

    def noise_minus_drift(
        self, xi: Mapping[str, Tensor], grads: Mapping[str, Tensor], k: float
    ) -> Params:
        """Return ``xi - k g`` (into ``xi``)."""
        return {n: x.sub_(grads[n], alpha=k) for n, x in xi.items()}

    def move(self, params: Mapping[str, Tensor], u: Mapping[str, Tensor], scale: float) -> Params:
        """Return ``theta + scale u`` (into ``u``)."""
        return {n: torch.add(v, u[n], alpha=scale, out=u[n]) for n, v in params.items()}


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

    def bind(self, context: BindContext) -> None:
        """Reset ``V`` (it is set from the first gradient)."""
        super().bind(context)
        self.v = {}
        self._g, self._root, self._scratch = {}, {}, {}

    def update(self, grads: Mapping[str, Tensor], step_size: float | None = None) -> None:
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

    def apply_at(self, grads: Mapping[str, Tensor]) -> Params:
        """Return ``sqrt(G) g`` (``A`` is diagonal: ``A^T = A``)."""
        return {k: g * self._root[k] for k, g in grads.items()}

    def apply_a(self, u: Mapping[str, Tensor]) -> Params:
        """Return ``sqrt(G) u``, into ``u``."""
        return {k: x.mul_(self._root[k]) for k, x in u.items()}

    def noise_minus_drift(
        self, xi: Mapping[str, Tensor], grads: Mapping[str, Tensor], k: float
    ) -> Params:
        """Return ``xi - k sqrt(G) g``, into ``xi`` (one pass, no temporary)."""
        return {n: x.addcmul_(grads[n], self._root[n], value=-k) for n, x in xi.items()}

    def move(self, params: Mapping[str, Tensor], u: Mapping[str, Tensor], scale: float) -> Params:
        """Return ``theta + scale sqrt(G) u``, into ``u`` (one pass)."""
        return {
            n: torch.addcmul(v, u[n], self._root[n], value=scale, out=u[n])
            for n, v in params.items()
        }

    def health(self) -> dict[str, str]:
        """Sites where ``V`` is not finite (``M = 0``: the site stops moving) or ``G`` is 0."""
        out = {}
        for k, v in self.v.items():
            if not bool(torch.isfinite(v).all()):
                out[k] = (
                    "RMSprop's second moment V is not finite there, so M = 1 / (eps + sqrt(V)) is "
                    "0 and the site no longer moves (its gradient overflowed)"
                )
        return out

    def advice(self, site: str) -> str:
        """RMSprop's ``M`` reaches ``1 / eps`` where a site's gradient vanishes."""
        return (
            f"RMSprop's M grows up to 1/eps = {1.0 / self.eps:.3g} where the per-datum gradient "
            "vanishes, and the noise with it: use a smaller step size, freeze_after_warmup=True "
            "or a larger eps"
        )

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

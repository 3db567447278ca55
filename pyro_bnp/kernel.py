r"""The Pyro glue: :class:`SGLD`, a :class:`~pyro.infer.mcmc.mcmc_kernel.MCMCKernel`.

The kernel is a thin holder of state. The numerics live in
:mod:`pyro_bnp.preconditioners`, :mod:`pyro_bnp.bnp` and :mod:`pyro_bnp.schedules`
(pure torch); layer statistics in :mod:`pyro_bnp.layers`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import pyro
import torch
from pyro.distributions import is_validation_enabled
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
)
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.nn import PyroModule
from pyro.poutine import trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from torch.distributions import Independent, Normal, biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

from pyro_bnp.preconditioners import Identity, LayerRef, Preconditioner, RMSprop

__all__ = ["SGLD", "init_to_median_or_sample"]

Schedule = Callable[[int], float]


def init_to_median_or_sample(site: dict | None = None, num_samples: int = 15) -> Any:
    """Initialise a site to its prior median, or to a prior draw for matrix-shaped sites.

    SGLD has no accept/reject step, so where a chain starts matters: Pyro's HMC default
    (uniform in ``[-2, 2]`` on the unconstrained space) can throw a scale parameter so far that
    the first gradients explode. The prior median is safe for ordinary sites. Sites with two or
    more dimensions (network weights) get a prior draw instead, because a median of zero makes
    every hidden unit identical and the symmetry is never broken.

    Parameters
    ----------
    site : dict, optional
        A Pyro sample message; without it the configured strategy is returned.
    num_samples : int
        Draws used for the empirical median.
    """
    if site is None:
        return functools.partial(init_to_median_or_sample, num_samples=num_samples)
    if len(site["fn"].shape()) >= 2:
        return init_to_sample(site)
    return init_to_median(site, num_samples=num_samples)


class _Plates(Messenger):
    """Inject subsample indices into ``pyro.plate`` sites and record the plates seen.

    An int instead of an index tensor means "the first rows": ``arange(min(B, size))``, which
    lets the set-up run go through before a too large ``B`` is reported. A latent site inside
    a subsampled plate raises at once (before the model trips over the batch dimension such a
    site gets, e.g. a network weight first accessed inside the data plate).
    """

    check_local = True

    def __init__(self, indices: Mapping[str, Tensor | int]) -> None:
        super().__init__()
        self.indices = indices
        self.seen: dict[str, tuple[int, int | None]] = {}

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if not isinstance(fn, _Subsample):
            if self.check_local and not msg["is_observed"]:
                for frame in msg["cond_indep_stack"]:
                    size, sub = self.seen.get(frame.name, (0, None))
                    if frame.name in self.indices or (sub is not None and sub < size):
                        raise _local_latent_error(msg["name"], frame.name)
            return
        name = msg["name"]
        self.seen[name] = (fn.size, fn.subsample_size)
        idx = self.indices.get(name)
        if isinstance(idx, int):
            idx = torch.arange(min(idx, fn.size))
        if idx is not None and msg["value"] is None:
            if fn.subsample_size is not None and fn.subsample_size != len(idx):
                raise ValueError(
                    f"plate {name!r} sets subsample_size={fn.subsample_size} in the model, but "
                    f"the kernel's subsample_size asks for {len(idx)}: set it in one place only"
                )
            msg["value"] = idx


class _LogJoint(_Plates):
    """Condition latent sites, inject plate indices and add up ``scale * log_prob``.

    A lighter replacement for ``poutine.trace`` + ``poutine.condition``: nothing is recorded but
    the running sum of the log density.
    """

    check_local = False  # done once at set-up

    def __init__(
        self,
        values: Mapping[str, Tensor],
        indices: Mapping[str, Tensor],
        cached: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(indices)
        self.values = values
        self.total: Tensor | float = 0.0
        self.cached = cached or {}  # sites the module cache should have answered
        self.bypassed: str | None = None

    def _pyro_sample(self, msg: Any) -> None:
        super()._pyro_sample(msg)
        if msg["name"] in self.cached:  # the cache did not answer: the caller falls back
            self.bypassed = msg["name"]
        value = self.values.get(msg["name"])
        if value is not None and not msg["is_observed"]:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: Any) -> None:
        if isinstance(msg["fn"], _Subsample) or msg["infer"].get("_deterministic"):
            return
        scale = msg["scale"]
        if msg["mask"] is None and isinstance(scale, numbers.Real):
            fast = _iid_normal_log_prob_sum(msg["fn"], msg["value"], float(scale))
            if fast is not None:
                self.total = self.total + fast
                return
        log_prob = msg["fn"].log_prob(msg["value"])
        self.total = self.total + scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_NORMAL_LOG_PROB = Normal.log_prob  # subclasses that override log_prob take the slow path


def _iid_normal_log_prob_sum(fn: Any, value: Tensor, factor: float = 1.0) -> Tensor | None:
    """``factor * fn.log_prob(value).sum()`` by one difference and one dot product, else None.

    For a Normal (possibly ``.expand(...).to_event(k)``) whose ``scale`` is one value
    broadcast (stride 0), the shape of ``value``: the usual prior of network weights (``loc``
    one value too: no difference at all when it is a constant 0) and the usual Gaussian
    likelihood with a fixed or latent noise scale. ``Normal.log_prob`` costs five elementwise
    passes and their backward. ``loc`` and ``scale`` keep their autograd graph (hierarchical
    priors and latent noise scales work).
    """
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal) or type(base).log_prob is not _NORMAL_LOG_PROB:
        return None
    loc, scale = base.loc, base.scale
    if loc.shape != value.shape or scale.shape != value.shape or any(scale.stride()):
        return None
    n = value.numel()
    if n == 0:
        return None
    scale0 = scale.reshape(-1)[0]
    flat = value.reshape(-1)
    if any(loc.stride()):
        diff = flat - loc.reshape(-1)
    else:  # one value broadcast
        loc0 = loc.reshape(-1)[0]
        diff = flat if (not loc0.requires_grad and float(loc0) == 0.0) else flat - loc0
    ss = torch.dot(diff, diff)
    if not scale0.requires_grad:  # a constant: the scalar arithmetic in Python floats
        s0 = float(scale0)
        return ss * (-0.5 * factor / s0**2) + factor * -n * (math.log(s0) + _HALF_LOG_2PI)
    out = -0.5 * ss / scale0.square() - n * (scale0.log() + _HALF_LOG_2PI)
    return out if factor == 1.0 else out * factor


def _iid_normal_constants(fn: Any, shape: torch.Size) -> tuple[float, float, float] | None:
    """``(loc, 1 / scale^2, log-normaliser)`` of a fixed i.i.d. Normal of ``shape``, else None.

    Fixed: ``loc`` and ``scale`` are single values that do not require gradients, so the log
    density ``-0.5 (v - loc)^2 / scale^2 + const`` and its gradient are known in closed form.
    """
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal) or type(base).log_prob is not _NORMAL_LOG_PROB:
        return None
    if tuple(fn.batch_shape + fn.event_shape) != tuple(shape):
        return None
    loc, scale = base.loc, base.scale
    if loc.requires_grad or scale.requires_grad or any(loc.stride()) or any(scale.stride()):
        return None
    n = math.prod(shape)
    if n == 0:
        return None
    loc0, scale0 = float(loc.reshape(-1)[0]), float(scale.reshape(-1)[0])
    if not (scale0 > 0.0 and math.isfinite(scale0) and math.isfinite(loc0)):
        return None
    return loc0, 1.0 / scale0**2, -n * (math.log(scale0) + _HALF_LOG_2PI)


class _ModuleSite(NamedTuple):
    """A ``PyroSample`` weight whose value the kernel hands to the module directly."""

    fullname: str  # the key of PyroModule's per-call cache (the site name)
    iid: tuple[float, float, float] | None  # _iid_normal_constants, or None: log_prob in graph
    prior: Any  # the PyroSample's distribution


def _module_sites(model: Any, tr: Any, latent: Iterable[str]) -> dict[str, _ModuleSite]:
    """Find the latent sites of a PyroModule model that the cache fast path may take over.

    A ``PyroSample`` attribute with a fixed distribution prior is sampled by PyroModule's
    ``__getattr__`` only when the value is not in the module's per-call cache yet; the kernel
    fills that cache with its values before running the model, so those sites never reach
    Pyro's effect handlers, and adds their log prior itself. A site qualifies when, in the
    set-up trace, it was exactly that sample statement: the same prior object, scale 1, no
    mask, outside every plate, and its module shares the model's context. Anything else (a
    plain-function model, priors that are callables of the module, handlers inside the model
    that scale or mask the site) keeps the general path.
    """
    ctx = getattr(model, "_pyro_context", None)
    if not isinstance(model, PyroModule) or ctx is None or not hasattr(ctx, "cache"):
        return {}
    priors: dict[str, Any] = {}
    for module in model.modules():
        samples = module.__dict__.get("_pyro_samples")
        if not samples or module.__dict__.get("_pyro_context") is not ctx:
            continue
        prefix = module.__dict__.get("_pyro_name", "")
        for attr, prior in samples.items():
            priors[f"{prefix}.{attr}" if prefix else attr] = prior
    out: dict[str, _ModuleSite] = {}
    for name in latent:
        site = tr.nodes.get(name)
        prior = priors.get(name)
        if (
            site is None
            or prior is None
            or site["fn"] is not prior
            or not isinstance(site["scale"], numbers.Real)
            or site["scale"] != 1.0
            or site["mask"] is not None
            or site["cond_indep_stack"]
        ):
            continue
        out[name] = _ModuleSite(name, _iid_normal_constants(prior, site["value"].shape), prior)
    return out


def _local_latent_error(site: str, plate: str) -> ValueError:
    return ValueError(
        f"latent site {site!r} is inside the subsampled plate {plate!r}: local latent "
        "variables are not supported; sample it outside the data plate (for a PyroModule: "
        "touch its PyroSample weights before entering the plate, see the SGLD docstring)"
    )


def _norm(values: Mapping[str, Tensor]) -> float:
    """Euclidean norm over all tensors, one pass each (inf or nan if any entry is not finite)."""
    out = math.hypot(*(float(torch.linalg.vector_norm(v)) for v in values.values()))
    if math.isinf(out) and all(bool(torch.isfinite(v).all()) for v in values.values()):
        # finite entries whose squares overflow: rescale (rare, so the extra passes are fine)
        big = max(float(v.abs().max()) for v in values.values())
        out = big * math.hypot(*(float(torch.linalg.vector_norm(v / big)) for v in values.values()))
    return out


def _exclusive(grads: Mapping[str, Tensor]) -> set[str]:
    """Names of the gradients that may be updated in place.

    ``torch.autograd.grad`` returns fresh tensors, except that a gradient passed through
    unchanged (a sum, an addition) can be one expanded tensor shared by several inputs: only
    contiguous tensors whose storage no other gradient uses qualify.
    """
    ptrs = [g.untyped_storage().data_ptr() for g in grads.values()]
    return {
        k
        for (k, g), p in zip(grads.items(), ptrs, strict=True)
        if g.is_contiguous() and ptrs.count(p) == 1
    }


def _max_abs(values: Mapping[str, Tensor]) -> float:
    """Largest absolute entry over all tensors (nan if any entry is nan): one reduction each."""
    out = 0.0
    for v in values.values():
        if v.numel():
            m = float(v.abs().max())
            if not m <= out:  # larger, or nan
                out = m
    return out


def _check_data(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    """Raise a ValueError naming the argument and index of the first NaN in the model's data."""
    try:
        target = model.forward if isinstance(model, nn.Module) else model
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        names = []
    items = [
        (names[i] if i < len(names) else f"#{i}", f"positional argument {i}", a)
        for i, a in enumerate(args)
    ] + [(k, "keyword argument", v) for k, v in kwargs.items()]
    for name, kind, value in items:
        if isinstance(value, Tensor) and value.is_floating_point():
            bad = torch.isnan(value)
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"the data contain NaN: {kind} {name!r} (shape {tuple(value.shape)}) at index "
                    f"{index} ({int(bad.sum())} NaN in all); remove or impute them before sampling"
                )


def _is_identity(t: Transform) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    real = isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)
    if isinstance(value, bool) or not real:  # no strings: "1" would be a silent conversion
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not ok or not math.isfinite(value):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind} and finite, got {value!r}")
    return value


def _check_count(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a positive integer (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _make_preconditioner(spec: str | Preconditioner) -> Preconditioner:
    if isinstance(spec, Preconditioner):
        return spec
    if spec == "identity":
        return Identity()
    if spec == "rmsprop":
        return RMSprop()
    if spec in ("bnp", "bnp+rmsprop"):
        from pyro_bnp.bnp import BNP

        return BNP(rmsprop=RMSprop() if spec == "bnp+rmsprop" else None)
    raise ValueError(
        "preconditioner must be 'identity', 'rmsprop', 'bnp', 'bnp+rmsprop' or a "
        f"pyro_bnp.Preconditioner instance, got {spec!r}"
    )


class SGLD(MCMCKernel):
    r"""Stochastic gradient Langevin dynamics with BNP, RMSprop or no preconditioning.

    Targets the tempered posterior :math:`\pi_T(\theta) \propto \exp(-U(\theta) / T)` with
    :math:`U = -\log p(y \mid \theta) - \log p(\theta)` on Pyro's unconstrained space
    (log-det-Jacobians included), through the update

    .. math::

        \theta_{t+1} = \theta_t - \frac{\epsilon_t}{2} M \nabla \hat U(\theta_t)
            + \sqrt{\epsilon_t T}\, A \xi_t, \qquad M = A A^\top,\ \xi_t \sim N(0, I),

    where :math:`\hat U` is the mini-batch estimate of ``U`` (the likelihood of ``B`` rows of
    a plate of ``N`` rows, scaled by ``N / B``, exactly what ``pyro.plate`` does when it
    subsamples). No Metropolis correction is made: the chain is biased by ``O(eps)``, as every
    SGLD is. Conventions: our ``eps`` is the variance of the injected noise (for ``T = 1``), the
    drift is ``eps / 2`` times the gradient. The ``posteriors`` library and BlackJAX's ``sgld``
    write the drift step as ``lr * grad`` with noise variance ``2 lr``: their ``lr`` is our
    ``eps / 2``.

    Parameters
    ----------
    model : callable
        A Pyro model with continuous latent sites, none of them inside a subsampled plate.
        Network weights must be sampled *before* the data plate is entered (see Notes).
    step_size : float or callable
        ``eps``: a positive float, or a schedule ``step -> float`` (see
        :mod:`pyro_bnp.schedules`) evaluated at every update (0-based, warmup included).
    subsample_size : None, int or dict
        ``None``: the model's plates decide (full data unless the model subsamples itself).
        ``{plate_name: B}``: the kernel feeds plate ``plate_name`` with ``B`` indices per update,
        in shuffled epochs without replacement. An ``int``: the model has exactly one plate that
        holds observations; finding it costs one full-data run of the model at every set-up,
        after which the attribute :attr:`subsample_size` holds the resolved ``{plate_name: B}``.
    preconditioner : str or Preconditioner
        ``"bnp"`` (default), ``"bnp+rmsprop"``, ``"rmsprop"`` (pSGLD), ``"identity"`` (plain
        SGLD) or an instance such as :class:`pyro_bnp.RMSprop`.
    temperature : float
        ``T >= 0``; ``T < 1`` gives a cold posterior, ``T = 0`` a (preconditioned) gradient
        descent.
    thin : int
        Updates per returned draw (warmup draws included), so a run makes
        ``(warmup_steps + num_samples) * thin + 1`` gradient evaluations (one at the initial
        point), besides the set-up run of the model.
    init_strategy : callable
        A Pyro init strategy; default :func:`init_to_median_or_sample`. User
        ``initial_params`` (unconstrained, as for HMC) take precedence.
    modules : nn.Module or iterable of nn.Module, optional
        The networks whose layer inputs BNP reads. Default: the model itself if it is an
        ``nn.Module`` (a ``PyroModule``); a plain-function model that closes over a network
        names it here.
    max_rejections : int
        A step whose log density or gradient is not finite is rejected (the chain stays where
        it was and the draw is flagged ``diverging``); this many rejections in a row raise an
        error.
    max_abs_param : float
        An update that takes any unconstrained parameter beyond this absolute value (the chain
        is exploding) raises an error naming the update and suggesting a step size.

    Notes
    -----
    **Sample the weights of a PyroModule outside the data plate.** A ``PyroSample`` attribute is
    sampled at its first access during ``forward``, inside whatever plates are active at that
    moment, and cached for the rest of the call. Calling the network inside
    ``pyro.plate("data", N)`` would therefore put every weight inside the data plate (an error
    with ``subsample_size``: a latent site in a subsampled plate). Touch the weights first and
    call the layers on the mini-batch inside the plate::

        def forward(self, x, y=None):
            for layer in (self.fc1, self.fc2):  # sampled here, outside the plate
                _ = layer.weight, layer.bias
            with pyro.plate("data", x.shape[0]) as idx:
                mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
                pyro.sample("obs", dist.Normal(mean, 0.1), obs=None if y is None else y[idx])

    (Calling the network outside the plate on the full ``x`` and observing inside also keeps
    the weights global, but evaluates the network, and BNP's layer statistics, on every row.)

    **Subsampling.** With ``subsample_size={"data": B}`` the plate of ``N`` rows is fed
    consecutive slices of a random permutation: ``N // B`` consecutive gradient evaluations see
    every row once (the ``N % B`` rows left over are skipped in that epoch), then a new
    permutation is drawn from the chain's generator. The indices reach the model as the value
    of ``pyro.plate(...)`` (``with pyro.plate("data", N) as idx``), and the plate scales the
    likelihood by ``N / B``, so ``U_hat`` is unbiased.

    **Randomness.** At :meth:`setup` every chain draws a seed from torch's global generator
    (``diagnostics()["rng_seed"]``); the noise ``xi`` (site by site in sorted name order) and
    the permutations come from a ``torch.Generator`` with that seed, so ``pyro.set_rng_seed``
    makes a run reproducible. Pyro reuses one kernel for sequential chains; :meth:`setup`
    resets every piece of chain state. The kernel pickles (also mid-chain, with its layer
    hooks), as Pyro's multiprocessing chains need. Caveat (Pyro 1.9): with chains in parallel
    processes, Pyro hands every chain the *last* chain's ``initial_params`` (it sets them on the
    one shared kernel before the workers are started); per-chain initial values work with
    sequential chains.

    Examples
    --------
    >>> kernel = SGLD(model, step_size=1e-4, subsample_size={"data": 128})  # doctest: +SKIP
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=500, warmup_steps=500)  # doctest: +SKIP
    >>> mcmc.run(x, y)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable[..., Any],
        step_size: float | Schedule = 1e-4,
        *,
        subsample_size: int | Mapping[str, int] | None = None,
        preconditioner: str | Preconditioner = "bnp",
        temperature: float = 1.0,
        thin: int = 1,
        init_strategy: Callable[..., Any] = init_to_median_or_sample,
        modules: nn.Module | Iterable[nn.Module] | None = None,
        max_rejections: int = 20,
        max_abs_param: float = 1e10,
    ) -> None:
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        if callable(step_size):
            self.step_size: float | Schedule = step_size
        else:
            self.step_size = _check_positive("step_size", step_size)
        self.temperature = _check_positive("temperature", temperature, allow_zero=True)
        self.thin = _check_count("thin", thin)
        self.max_rejections = _check_count("max_rejections", max_rejections)
        self.max_abs_param = _check_positive("max_abs_param", max_abs_param)
        self._subsample_spec = self._check_subsample(subsample_size)
        self.subsample_size: int | dict[str, int] | None = self._subsample_spec
        self.preconditioner = _make_preconditioner(preconditioner)
        if not callable(init_strategy):
            raise ValueError(f"init_strategy must be callable, got {init_strategy!r}")
        self.init_strategy = init_strategy
        if modules is None:
            self.modules: tuple[nn.Module, ...] = (model,) if isinstance(model, nn.Module) else ()
        elif isinstance(modules, nn.Module):
            self.modules = (modules,)
        else:
            self.modules = tuple(modules)
            for m in self.modules:
                if not isinstance(m, nn.Module):
                    raise ValueError(f"modules must be nn.Module instances, got {type(m)}")
        self._user_initial_params: dict[str, Tensor] | None = None
        self.transforms: dict[str, Transform] | None = None
        self._warned_no_layers = False  # warn once per kernel, not once per chain
        self._warned_prior: set[str] = set()  # layers warned about by _check_prior_stability
        self._save_params: list[str] | None = None
        self._resume: dict[str, Any] | None = None  # a state_dict() to continue from
        self._resume_applied = False
        self._reset()

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_subsample(spec: Any) -> int | dict[str, int] | None:
        if spec is None:
            return None
        if isinstance(spec, Mapping):
            out = {}
            for name, b in spec.items():
                if not isinstance(name, str):
                    raise ValueError(
                        "subsample_size must map plate names (str) to batch sizes, got key "
                        f"{name!r}"
                    )
                out[name] = _check_count(f"subsample_size[{name!r}]", b)
            return out
        if isinstance(spec, bool) or not isinstance(spec, numbers.Integral) or spec < 1:
            raise ValueError(
                "subsample_size must be None, a positive int or a dict {plate_name: batch_size}, "
                f"got {spec!r}"
            )
        return int(spec)

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._args: tuple[Any, ...] = ()
        self._kwargs: dict[str, Any] = {}
        self._warmup_steps = 0
        self._initial_params: dict[str, Tensor] | None = None
        self._to_constrained: dict[str, Transform] = {}
        self._identity: set[str] = set()
        self._module_sites: dict[str, _ModuleSite] = {}  # PyroSample sites fed via the cache
        self._inject: dict[str, tuple[int, int]] = {}  # plates the kernel feeds
        self._own_plates: dict[str, tuple[int, int]] = {}  # plates the model subsamples
        self._perms: dict[str, Tensor] = {}
        self._pos: dict[str, int] = {}
        self._rng: torch.Generator | None = None
        self._rng_seed = 0
        self._started = False
        self._hooks: Any = None
        self._layers: tuple[LayerRef, ...] = ()
        self._t = 0  # SGLD updates done
        self._draw = 0  # calls to sample()
        self._lp = math.nan
        self._grads: dict[str, Tensor] = {}
        self._gnorm = math.nan
        self._z: dict[str, Tensor] = {}  # the state the cached lp / gradient belong to
        self._eps = math.nan
        self._rejected_in_row = 0
        self._num_data = 1.0
        self._stats: dict[str, list[Any]] = {
            "lp": [],
            "step_size": [],
            "grad_norm": [],
            "diverging": [],
        }
        self._warmup_divergences = 0
        self._last_diverging = False
        self._returned: dict[str, Tensor] | None = None

    @property
    def initial_params(self) -> dict[str, Tensor]:
        """Unconstrained initial parameters of the current chain (set by :meth:`setup`)."""
        if self._initial_params is not None:
            return self._initial_params
        return self._user_initial_params or {}

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        # Checked against the model's sites (names, shapes) by the next :meth:`setup`.
        if params is None:
            self._user_initial_params = None
            return
        if not isinstance(params, Mapping):
            raise ValueError(
                f"initial_params must be a dict {{site: unconstrained tensor}}, got {params!r}"
            )
        for name, v in params.items():
            if not isinstance(v, Tensor):
                raise ValueError(
                    f"initial_params[{name!r}] must be a tensor (unconstrained value), got "
                    f"{type(v).__name__}"
                )
        self._user_initial_params = dict(params)

    @property
    def save_params(self) -> list[str]:
        """The sites Pyro's samplers record, sorted (``MCMC(save_params=...)`` sets it).

        Kept sorted because Pyro packs each draw in this order but unpacks it in sorted name
        order: an unsorted list would give one site's values to another. Unset (the default),
        the attribute does not exist and Pyro records every latent site.
        """
        if self._save_params is None:
            raise AttributeError("save_params")
        return self._save_params

    @save_params.setter
    def save_params(self, names: Iterable[str] | None) -> None:
        if names is None:
            self._save_params = None
            return
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"save_params must be a list of site names, got {names!r}")
        self._save_params = sorted(set(names))

    # ------------------------------------------------------------------ set-up
    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Reset all state for a new chain, find the latent sites and initialise them.

        Cheap: one run of the model without gradients, on the first ``B`` rows of each plate
        named in a dict ``subsample_size`` (on the full data when ``subsample_size`` is an int,
        which must find the plate). The preconditioner is reset here; layer hooks and the first
        gradient evaluation wait for the first :meth:`sample` call, so ``setup(0, ...)`` (Pyro
        calls it in the main process to read :attr:`transforms`) leaves nothing behind on the
        model.

        Raises
        ------
        ValueError
            For a discrete latent site, a latent site inside a subsampled plate, an unknown
            plate or a batch larger than its plate in ``subsample_size``, or ``initial_params``
            naming an unknown site or having a wrong shape.
        """
        self.cleanup()
        self._reset()
        self._warmup_steps = int(warmup_steps)
        self._args, self._kwargs = args, kwargs
        _check_data(self.model, args, kwargs)
        self._rng_seed = int(torch.randint(0, 2**62, ()).item())
        self._rng = torch.Generator().manual_seed(self._rng_seed)

        user = self._user_initial_params

        spec = self._subsample_spec
        batch = spec if isinstance(spec, dict) else {}
        plates = _Plates(batch)
        with plates, torch.no_grad():
            tr = trace(InitMessenger(self.init_strategy)(self.model)).get_trace(*args, **kwargs)
        self._resolve_plates(plates.seen, tr)

        to_constrained: dict[str, Transform] = {}
        z0: dict[str, Tensor] = {}
        for name, site in tr.nodes.items():
            if (
                site["type"] != "sample"
                or site["is_observed"]
                or isinstance(site["fn"], _Subsample)
            ):
                continue
            fn: Any = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"site {name!r} is a discrete latent variable ({type(fn).__name__}); SGLD "
                    "needs continuous latent sites: marginalise it out or make it observed"
                )
            for frame in site["cond_indep_stack"]:
                if frame.name in self._inject or frame.name in self._own_plates:
                    raise _local_latent_error(name, frame.name)
            t = biject_to(fn.support)
            to_constrained[name] = t
            z0[name] = t.inv(site["value"]).detach()
        if not z0:
            raise ValueError("the model has no latent sample sites to sample")
        # Pyro's convention: ``transforms`` map the constrained space to the unconstrained one.
        self.transforms = {k: t.inv for k, t in to_constrained.items()}
        self._to_constrained = to_constrained
        self._identity = {k for k, t in to_constrained.items() if _is_identity(t)}
        if user is not None:
            for name, v in user.items():
                if name not in z0:
                    raise ValueError(
                        f"initial_params has {name!r}, which is not a latent site; the latent "
                        f"sites are {sorted(z0)}"
                    )
                if tuple(v.shape) != tuple(z0[name].shape):
                    raise ValueError(
                        f"initial_params[{name!r}] has shape {tuple(v.shape)}, the site has "
                        f"{tuple(z0[name].shape)}"
                    )
                z0[name] = v.detach().to(z0[name].dtype)
        if self._save_params is not None:
            unknown = sorted(set(self._save_params) - set(z0))
            if unknown:
                raise ValueError(
                    f"save_params names {unknown}, which are not latent sites; the latent sites "
                    f"are {sorted(z0)}"
                )
        self._initial_params = z0
        self._module_sites = _module_sites(self.model, tr, z0)
        self._num_data = self._count_data(tr)
        # Fresh preconditioner state as soon as the chain is set up (re-done with the layers
        # by the first sample()).
        self.preconditioner.init(z0, num_data=self._num_data)
        self._resume_applied = False
        if self._resume is not None:
            self._apply_resume_position()

    def _resolve_plates(self, seen: Mapping[str, tuple[int, int | None]], tr: Any) -> None:
        """Fill ``_inject`` (plates the kernel feeds) and ``_own_plates`` for this chain.

        An int ``subsample_size`` is resolved anew at every set-up (from the value given to the
        constructor) and :attr:`subsample_size` shows the resolved ``{plate: B}``.
        """
        spec = self._subsample_spec
        if isinstance(spec, int):
            holders = []
            for name, (size, sub) in seen.items():
                if sub is not None and sub < size:
                    continue
                has_obs = any(
                    s["type"] == "sample"
                    and s["is_observed"]
                    and any(f.name == name for f in s["cond_indep_stack"])
                    for s in tr.nodes.values()
                )
                if has_obs:
                    holders.append(name)
            if len(holders) != 1:
                raise ValueError(
                    f"subsample_size={spec} needs exactly one plate with observations, found "
                    f"{sorted(holders)} among plates {sorted(seen)}; pass a dict "
                    "{plate_name: batch_size}"
                )
            spec = {holders[0]: spec}
        self.subsample_size = None if spec is None else dict(spec)
        for name, (size, sub) in seen.items():
            if sub is not None and sub < size:
                self._own_plates[name] = (size, sub)  # the model subsamples this one itself
        if spec is None:
            return
        for name, b in spec.items():
            if name not in seen:
                raise ValueError(
                    f"subsample_size names plate {name!r}, but the model has no such plate; "
                    f"its plates are {sorted(seen)}"
                )
            size = seen[name][0]
            if b > size:
                raise ValueError(
                    f"subsample_size[{name!r}]={b} is larger than the plate's size {size}"
                )
            self._inject[name] = (size, b)

    def _count_data(self, tr: Any) -> float:
        """Count the observations ``N`` (for RMSprop's per-datum convention)."""
        subsampled = {**self._own_plates, **self._inject}
        if subsampled:
            return float(math.prod(size for size, _ in subsampled.values()))
        best = 1
        for site in tr.nodes.values():
            if site["type"] == "sample" and site["is_observed"] and site["cond_indep_stack"]:
                n = math.prod(f.full_size or f.size for f in site["cond_indep_stack"])
                best = max(best, n)
        return float(best)

    def _start(self, z: dict[str, Tensor]) -> None:
        """First call to sample(): install hooks, initialise the preconditioner, evaluate."""
        layers: tuple[LayerRef, ...] = ()
        if getattr(self.preconditioner, "needs_layers", False):
            layers = self._install_layers()
        self._layers = layers
        self.preconditioner.init(z, num_data=self._num_data, layers=layers)
        if layers and hasattr(self.preconditioner, "set_priors"):
            self.preconditioner.set_priors(self._layer_priors())
        resume, self._resume = self._resume, None
        if resume is not None and resume["preconditioner"] is not None:
            self.preconditioner.load_state_dict(resume["preconditioner"])
        if resume is not None and resume["started"]:
            self._lp = float(resume["lp"])
            self._grads = {k: v.clone() for k, v in resume["grads"].items()}
            self._gnorm = _norm(self._grads)
            self._z = z
        else:
            self._evaluate_at(
                z, "at the initial point is not finite; check init_strategy or initial_params"
            )
        self._started = True
        if (
            resume is None
            and self._warmup_steps == 0
            and getattr(self.preconditioner, "freeze_after_warmup", False)
        ):
            self.preconditioner.freeze()  # no warmup: frozen from the first update on

    def _evaluate_at(self, z: dict[str, Tensor], what: str) -> None:
        """Evaluate the state ``z`` the chain is asked to continue from; it must be finite."""
        lp, grads = self._evaluate(z)
        gnorm = _norm(grads)
        if not (math.isfinite(lp) and math.isfinite(gnorm)):
            raise ValueError(f"the log density or its gradient {what} (lp={lp})")
        self._lp, self._grads, self._z, self._gnorm = lp, grads, z, gnorm

    def _check_state(self, z: dict[str, Tensor]) -> None:
        expected = self._initial_params or {}
        if z.keys() != expected.keys():
            raise ValueError(f"sample() needs the latent sites {sorted(expected)}, got {sorted(z)}")
        for k, v in z.items():
            if v.shape != expected[k].shape:
                raise ValueError(
                    f"sample(): params[{k!r}] has shape {tuple(v.shape)}, the site has "
                    f"{tuple(expected[k].shape)}"
                )

    def _install_layers(self) -> tuple[LayerRef, ...]:
        from pyro_bnp.layers import find_layers

        assert self._initial_params is not None
        cfg = self.preconditioner
        options = cfg.stats_options() if hasattr(cfg, "stats_options") else {}
        # BNP acts on the unconstrained parameters; it is exact only where they are the weights.
        sites = set(self._identity) & set(self._initial_params)
        layers, hooks = find_layers(self.modules, sites, **options)
        if not layers:
            if self._warned_no_layers:
                return ()
            self._warned_no_layers = True
            warnings.warn(
                f"{cfg!r} found no Linear/Conv layer whose weight is a latent site (pass "
                "modules= for a plain-function model); it acts as "
                + ("RMSprop" if getattr(cfg, "rmsprop", None) is not None else "the identity"),
                UserWarning,
                stacklevel=4,
            )
            return ()
        hooks.install()
        self._hooks = hooks
        return tuple(layers)

    def cleanup(self) -> None:
        """Remove the layer hooks (safe to call more than once)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    # ------------------------------------------------------------------ numerics glue
    def _next_indices(self) -> dict[str, Tensor]:
        out = {}
        for name in sorted(self._inject):
            size, b = self._inject[name]
            pos = self._pos.get(name, size)
            if pos + b > size:
                self._perms[name] = torch.randperm(size, generator=self._rng)
                pos = 0
            out[name] = self._perms[name][pos : pos + b]
            self._pos[name] = pos + b
        return out

    def _evaluate(
        self,
        z: Mapping[str, Tensor],
        norms: Mapping[str, float] | None = None,
        snapshot: list[tuple[Any, ...]] | None = None,
    ) -> tuple[float, dict[str, Tensor]]:
        """Mini-batch log joint (unconstrained, with log-det-Jacobians) and ``grad U_hat``.

        ``norms``: the Euclidean norm of each ``z[name]``, if the caller has them.
        ``snapshot``: the layer statistics before this evaluation, if the caller took them.
        """
        leaves = {k: v.detach().requires_grad_() for k, v in z.items()}
        values: dict[str, Tensor] = {}
        logdet: Tensor | float = 0.0
        for k, v in leaves.items():
            if k in self._identity:
                values[k] = v
            else:
                t = self._to_constrained[k]
                x = t(v)
                values[k] = x
                logdet = logdet + t.log_abs_det_jacobian(v, x).sum()
        sites = self._module_sites
        joint = _LogJoint(values, self._next_indices(), sites)
        live = self._stats_live()
        hooks = self._hooks
        if hooks is not None and hooks.installed != live:
            # frozen statistics observe nothing: unregistered hooks keep the modules' calls on
            # torch's fast path (registered ones cost ~4 us per layer even when switched off)
            if live:
                hooks.install()
            else:
                hooks.remove()
        with torch.enable_grad():
            if sites:
                # PyroSample weights: put the values in the module's per-call cache, so their
                # sample statements never run; their log prior is added below.
                ctx: Any = getattr(self.model, "_pyro_context")  # noqa: B009 (typed as Callable)
                if snapshot is None and live:
                    snapshot = self._stats_snapshot()
                with ctx:
                    for name, site in sites.items():
                        ctx.cache[site.fullname] = values[name]
                        if site.iid is None:
                            logdet = logdet + site.prior.log_prob(values[name]).sum()
                    self._run_model(joint, hooks if live else None)
                if joint.bypassed is not None:
                    return self._fallback(joint.bypassed, z, snapshot)
            else:
                self._run_model(joint, hooks if live else None)
            lp = joint.total + logdet
            names = list(leaves)
            grads: tuple[Tensor | None, ...]
            if isinstance(lp, Tensor):
                grads = torch.autograd.grad(-lp, [leaves[k] for k in names], allow_unused=True)
            elif sites:  # nothing but closed-form priors
                lp, grads = torch.zeros(()), (None,) * len(names)
            else:
                raise ValueError("the model's log density does not depend on its latent sites")
        out = {
            k: torch.zeros_like(leaves[k]) if g is None else g
            for k, g in zip(names, grads, strict=True)
        }
        value = float(lp.detach())
        if not sites:
            return value, out
        owned = _exclusive(out)
        for name, site in sites.items():
            if site.iid is None:
                continue
            # i.i.d. Normal prior in closed form: log p = -(v - loc)^2 / (2 s^2) + const,
            # -grad log p = (v - loc) / s^2
            loc, inv_var, const = site.iid
            v = z[name].detach()
            d = v if loc == 0.0 else v - loc
            if loc == 0.0 and norms is not None and name in norms:
                ss = norms[name] ** 2  # the caller's |v|, no extra pass
            else:
                ss = float(torch.dot(d.reshape(-1), d.reshape(-1)))
            value += const - 0.5 * inv_var * ss
            if name in owned:
                out[name].add_(d, alpha=inv_var)
            else:
                out[name] = torch.add(out[name], d, alpha=inv_var)
        return value, out

    def _run_model(self, joint: _LogJoint, hooks: Any) -> None:
        if hooks is not None:
            with hooks.active(), joint:
                self.model(*self._args, **self._kwargs)
        else:
            with joint:
                self.model(*self._args, **self._kwargs)

    def _fallback(
        self, site: str, z: Mapping[str, Tensor], snapshot: list[tuple[Any, ...]] | None
    ) -> tuple[float, dict[str, Tensor]]:
        """Evaluate through Pyro's handlers: a cached site reached ``pyro.sample`` after all."""
        warnings.warn(
            f"SGLD: site {site!r} did not come from the PyroModule cache as at set-up; "
            "using the general (slower) path from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        self._module_sites = {}
        if snapshot is not None:  # forget the layer statistics of the discarded run
            self._stats_restore(snapshot)
        return self._evaluate(z)

    def _step_size_at(self, t: int) -> float:
        if not callable(self.step_size):
            return self.step_size
        eps = self.step_size(t)
        try:
            ok = float(eps) > 0.0 and math.isfinite(float(eps))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"the step size schedule {self.step_size!r} returned {eps!r} at update {t}; "
                "it must return a positive finite float"
            )
        return float(eps)

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run ``thin`` SGLD updates from ``params`` and return the new unconstrained draw.

        An update whose proposal, log density or gradient is not finite is rejected: the chain
        stays where it was and the draw is flagged ``diverging``. ``max_rejections`` rejections
        in a row raise a ``RuntimeError``. Proposals are evaluated with Pyro's distribution
        validation off (as :class:`~pyro.infer.mcmc.api.MCMC` does by default), so an invalid
        parameter counts as a rejected step rather than an exception.

        The mini-batch log density and gradient of the last returned state are cached; if
        ``params`` is a different state (not what Pyro's samplers pass), it is evaluated anew.
        """
        if self._initial_params is None:
            raise RuntimeError("SGLD.sample() called before setup()")
        # Pyro passes back the dict we returned last (identity checks only: no tensor ops)
        returned = (
            params is self._returned
            and len(params) == len(self._z)
            and all(params.get(k) is v for k, v in self._z.items())
        )
        z = self._z if returned else {k: v.detach() for k, v in params.items()}
        if not self._started:
            self._check_state(z)
            self._start(z)
        elif not returned and not (
            z.keys() == self._z.keys() and all(torch.equal(v, self._z[k]) for k, v in z.items())
        ):
            # not the state this kernel returned last: the cached gradient does not apply
            self._check_state(z)
            self._evaluate_at(z, "at the parameters passed to sample() is not finite")
        diverging = False
        pre = self.preconditioner
        live = self._stats_live()
        for i in range(self.thin):
            eps = self._step_size_at(self._t)
            self._eps = eps
            pre.update(self._grads)
            if i == 0 and self._draw in (0, self._warmup_steps):  # at the start and after warmup
                self._check_prior_stability(eps)
            z_new = pre.step(z, self._grads, eps, self.temperature, self._rng)
            self._t += 1
            lp, grads, gnorm = math.nan, self._grads, self._gnorm
            # |theta|_inf <= |theta|_2: the cheap norms settle the usual case in one pass each
            norms = {k: float(torch.linalg.vector_norm(v)) for k, v in z_new.items()}
            largest = max(norms.values())
            if not largest <= self.max_abs_param:  # large, or not finite: look exactly
                largest = _max_abs(z_new)
            finite = math.isfinite(largest)
            if finite and largest > self.max_abs_param:
                raise RuntimeError(
                    f"SGLD: the chain is exploding: update {self._t} moved a parameter to "
                    f"|theta| = {largest:.3g} > max_abs_param={self.max_abs_param:g} (step size "
                    f"{eps:.3g}); try a smaller step size, e.g. {eps / 10:.3g}"
                )
            snapshot = self._stats_snapshot() if finite and live else None
            if finite:  # a non-finite proposal is rejected without running the model
                # Validation off (as in Pyro's MCMC): an invalid distribution parameter
                # makes a non-finite log density, i.e. a rejected step, not an exception.
                if is_validation_enabled():
                    with pyro.validation_enabled(False):
                        lp, grads = self._evaluate(z_new, norms, snapshot)
                else:
                    lp, grads = self._evaluate(z_new, norms, snapshot)
                gnorm = _norm(grads)  # one pass: finiteness check and the recorded norm
                finite = math.isfinite(lp) and math.isfinite(gnorm)
            if finite:
                z, self._lp, self._grads, self._gnorm = z_new, lp, grads, gnorm
                self._rejected_in_row = 0
            else:
                diverging = True
                if snapshot is not None:  # the rejected proposal's forward pass is forgotten
                    self._stats_restore(snapshot)
                self._rejected_in_row += 1
                if self._rejected_in_row >= self.max_rejections:
                    raise RuntimeError(
                        f"SGLD: {self._rejected_in_row} updates in a row gave a non-finite log "
                        f"density or gradient (last at update {self._t}, step size {eps:.3g}); "
                        "the step size is probably too large: try a smaller one (or raise "
                        f"max_rejections={self.max_rejections})"
                    )
        self._z = z
        self._returned = out = dict(z)  # a fresh dict: the caller may modify it
        self._last_diverging = diverging
        self._draw += 1
        if self._draw == self._warmup_steps and getattr(pre, "freeze_after_warmup", False):
            pre.freeze()
        if self._draw > self._warmup_steps:
            st = self._stats
            st["lp"].append(self._lp)
            st["step_size"].append(self._eps)
            st["grad_norm"].append(self._gnorm)
            st["diverging"].append(diverging)
        elif diverging:
            self._warmup_divergences += 1
        return out

    def _layer_priors(self) -> dict[str, tuple[float | None, float]]:
        """Layer -> (bias, weight) prior variances, for layers with closed-form Normal priors."""
        priors: dict[str, tuple[float | None, float]] = {}
        for layer in self._layers:
            w = self._module_sites.get(layer.weight)
            if w is None or w.iid is None:
                continue
            b = self._module_sites.get(layer.bias) if layer.bias is not None else None
            var_b = None if b is None or b.iid is None else 1.0 / b.iid[1]
            priors[layer.name] = (var_b, 1.0 / w.iid[1])
        return priors

    def _check_prior_stability(self, eps: float) -> None:
        """Warn (once per layer) when BNP's ``M`` makes a layer's Gaussian prior unstable."""
        pre: Any = self.preconditioner
        if not self._layers or getattr(pre, "rmsprop", True) is not None:
            return  # plain BNP only: with RMSprop, M's scale follows the gradients instead
        if getattr(pre, "prior_cap", None) is not None:
            return  # BNP(prior_cap=...) keeps nu below the cap itself
        priors = self._layer_priors()
        if not priors:
            return
        for name, nu in pre.prior_stability(eps, priors).items():
            if nu > 2.0 and name not in self._warned_prior:
                self._warned_prior.add(name)
                warnings.warn(
                    f"BNP layer {name!r}: (eps/2) lambda_max(M Lambda_prior) = {nu:.3g} > 2 at "
                    f"step size {eps:.3g}: the prior alone makes this layer's update overshoot "
                    "and grow (the chain oscillates or explodes); use a step size below "
                    f"{2.0 * eps / nu:.2g}, BNP(prior_cap=1.0), or preconditioner='bnp+rmsprop'",
                    RuntimeWarning,
                    stacklevel=3,
                )

    _STAT_FIELDS = ("mean", "var", "batch_size", "spatial_size", "num_batches", "num_skipped")

    def _stats_live(self) -> bool:
        """Whether a model evaluation can change the layer statistics (some are not frozen)."""
        return any(not layer.stats.frozen for layer in self._layers)

    def _stats_snapshot(self) -> list[tuple[Any, ...]] | None:
        """Return references to the layer statistics (``observe`` replaces, never mutates)."""
        if not self._layers:
            return None
        return [
            tuple(getattr(layer.stats, f, None) for f in self._STAT_FIELDS)
            for layer in self._layers
        ]

    def _stats_restore(self, snapshot: list[tuple[Any, ...]]) -> None:
        for layer, values in zip(self._layers, snapshot, strict=True):
            for field, value in zip(self._STAT_FIELDS, values, strict=True):
                if value is not None:
                    setattr(layer.stats, field, value)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue this chain exactly (tensors are cloned).

        The position, the cached mini-batch log density and gradient at it, the update and draw
        counters (so schedules continue), the generator state (noise and mini-batch order), the
        current epoch's permutation and the preconditioner's state (RMSprop's ``V``, BNP's layer
        statistics). Save it with ``torch.save``; continue with :meth:`load_state_dict`.
        """
        if self._initial_params is None or self._rng is None:
            raise RuntimeError("state_dict() needs a chain: call setup() (or run MCMC) first")
        z = self._z if self._started else self._initial_params
        return {
            "format": 1,
            "sites": {k: tuple(v.shape) for k, v in z.items()},
            "z": {k: v.detach().clone() for k, v in z.items()},
            "started": self._started,
            "lp": self._lp,
            "grads": {k: v.clone() for k, v in self._grads.items()},
            "t": self._t,
            "draw": self._draw,
            "eps": self._eps,
            "rejected_in_row": self._rejected_in_row,
            "rng_seed": self._rng_seed,
            "rng_state": self._rng.get_state(),
            "perms": {k: v.clone() for k, v in self._perms.items()},
            "pos": dict(self._pos),
            "preconditioner": self.preconditioner.state_dict() if self._started else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the chain saved by :meth:`state_dict` (in the same or another process).

        Applied at the next :meth:`setup` (so ``MCMC(kernel, ...).run(...)`` continues the
        chain), or at once if the kernel is set up and has not sampled yet. The position becomes
        :attr:`initial_params`; counters, generator, mini-batch order and preconditioner state
        are restored, so the continued run gives exactly the draws of an uninterrupted one,
        whatever the global seed is. ``warmup_steps`` of the continued run count the warmup
        draws still to do (0 after warmup). One state continues one chain: for several chains
        use one kernel per chain (a saved state is consumed by the first set-up that uses it).

        Raises
        ------
        ValueError
            If ``state`` is not a state of this kernel (format, sites and shapes are checked).
        """
        if not isinstance(state, Mapping) or state.get("format") != 1:
            raise ValueError("load_state_dict: not a pyro_bnp.SGLD state_dict (format 1)")
        self._resume = dict(state)
        self._resume_applied = False
        if self._initial_params is not None and not self._started:
            self._apply_resume_position()

    def _apply_resume_position(self) -> None:
        state = self._resume
        assert state is not None and self._initial_params is not None and self._rng is not None
        if self._resume_applied:
            return
        expected = {k: tuple(v.shape) for k, v in self._initial_params.items()}
        if dict(state["sites"]) != expected:
            raise ValueError(
                f"load_state_dict: the saved chain has sites {state['sites']}, this model has "
                f"{expected}"
            )
        self._initial_params = {
            k: v.clone().to(self._initial_params[k].dtype) for k, v in state["z"].items()
        }
        self._warmup_steps += int(state["draw"])  # warmup_steps counts the remaining warmup
        self._t, self._draw = int(state["t"]), int(state["draw"])
        self._eps = float(state["eps"])
        self._rejected_in_row = int(state["rejected_in_row"])
        self._rng_seed = int(state["rng_seed"])
        self._rng.set_state(state["rng_state"])
        self._perms = {k: v.clone() for k, v in state["perms"].items()}
        self._pos = dict(state["pos"])
        self._resume_applied = True

    def last_draw_stats(self) -> dict[str, Any]:
        """Statistics of the draw :meth:`sample` returned last (for hooks that stream draws).

        ``lp``, ``step_size``, ``grad_norm``, ``diverging`` and ``warmup`` (True during warmup).
        """
        warmup = self._draw <= self._warmup_steps
        grad_norm = self._gnorm
        return {
            "lp": self._lp,
            "step_size": self._eps,
            "grad_norm": grad_norm,
            "diverging": self._last_diverging,
            "warmup": warmup,
        }

    # ------------------------------------------------------------------ reporting
    def logging(self) -> OrderedDict[str, str]:
        """Progress bar fields: step size, mini-batch log density, divergences."""
        n_div = sum(self._stats["diverging"]) + self._warmup_divergences
        return OrderedDict(
            [("step size", f"{self._eps:.2e}"), ("lp", f"{self._lp:.4g}"), ("div", str(n_div))]
        )

    def diagnostics(self) -> dict[str, Any]:
        """Per-draw statistics of the post-warmup draws, the same keys for every chain.

        ``lp`` (mini-batch estimate of the log joint at the draw, unconstrained space),
        ``step_size`` (of the draw's last update, so schedules can be checked),
        ``grad_norm`` (of ``grad U_hat``), ``diverging`` (a rejected update within the draw),
        ``divergences`` (post-warmup draw indices, as Pyro's ``MCMC.summary`` counts them),
        ``warmup_divergences`` and ``rng_seed`` (the chain's generator seed).
        """
        st = self._stats
        return {
            "lp": list(st["lp"]),
            "step_size": list(st["step_size"]),
            "grad_norm": list(st["grad_norm"]),
            "diverging": list(st["diverging"]),
            "divergences": [i for i, d in enumerate(st["diverging"]) if d],
            "warmup_divergences": self._warmup_divergences,
            "rng_seed": self._rng_seed,
        }

    def config(self) -> dict[str, Any]:
        """Return the kernel's settings, for export attributes."""
        return {
            "kernel": type(self).__name__,
            "step_size": repr(self.step_size),
            "preconditioner": repr(self.preconditioner),
            "temperature": self.temperature,
            "thin": self.thin,
            "subsample_size": repr(self.subsample_size),
            "rng_seed": self._rng_seed,
        }

    def __getstate__(self) -> dict[str, Any]:
        # The layer hooks (if installed) are pickled together with the network they sit on
        # and the statistics they feed, so a copy made mid-chain continues exactly.
        state = self.__dict__.copy()
        rng = state.get("_rng")
        state["_rng"] = None if rng is None else rng.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng_state = state.get("_rng")
        self.__dict__.update(state)
        if rng_state is not None:
            self._rng = torch.Generator()
            self._rng.set_state(rng_state)

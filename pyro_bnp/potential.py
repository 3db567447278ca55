r"""The minibatch potential: a Pyro model's log density and its gradient on a mini-batch.

:class:`MinibatchPotential` is made once per chain from one set-up trace of the model. It owns
everything the samplers need to know about the model: the latent sites and their transforms to
the unconstrained space, the plates and the indices the kernel feeds them, the observation count
``N``, the PyroModule cache path (``PyroSample`` weights handed to the module directly, with
closed-form Normal priors) and the fixed i.i.d. Normal priors of every site (read from the trace,
whatever the model pattern). Calling it gives ``(log density, grad U_hat)``::

    potential = MinibatchPotential(model, (x, y), subsample_size={"data": 128})
    lp, grads = potential(potential.initial_params, {"data": torch.arange(128)})

It can be used on its own (a custom loop, a test); :class:`pyro_bnp.SGLD` is built on it. Besides
:mod:`pyro_bnp.layers`, this is the only module that knows PyroModule internals.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
)
from pyro.nn import PyroModule
from pyro.poutine import trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from torch.distributions import Independent, Normal, biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

from pyro_bnp.layers import LayerHooks
from pyro_bnp.preconditioners import NormalPrior

__all__ = ["MinibatchPotential", "init_to_median_or_sample"]


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
        self.plain_function = False  # the model is not a PyroModule (for the error's advice)

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if not isinstance(fn, _Subsample):
            if self.check_local and not msg["is_observed"]:
                for frame in msg["cond_indep_stack"]:
                    size, sub = self.seen.get(frame.name, (0, None))
                    if frame.name in self.indices or (sub is not None and sub < size):
                        raise _local_latent_error(msg["name"], frame.name, self.plain_function)
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
        traced: bool = False,
    ) -> None:
        super().__init__(indices)
        self.values = values
        self.traced = traced  # tensor arithmetic only (no host reads): for tracing
        self.total: Tensor | float = 0.0
        self.cached = cached or {}  # sites the module cache should have answered
        self.bypassed: str | None = None
        # (name, value, plates) of the observed sites, read only if the total is not finite
        self.observed: list[tuple[str, Tensor, tuple[Any, ...]]] = []

    def _pyro_sample(self, msg: Any) -> None:
        super()._pyro_sample(msg)
        if msg["name"] in self.cached:  # the cache did not answer: the caller falls back
            self.bypassed = msg["name"]
        if msg["is_observed"] and not isinstance(msg["fn"], _Subsample):
            self.observed.append((msg["name"], msg["value"], tuple(msg["cond_indep_stack"])))
        value = self.values.get(msg["name"])
        if value is not None and not msg["is_observed"]:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: Any) -> None:
        if isinstance(msg["fn"], _Subsample) or msg["infer"].get("_deterministic"):
            return
        scale = msg["scale"]
        if msg["mask"] is None and isinstance(scale, numbers.Real):
            fast = _iid_normal_log_prob_sum(msg["fn"], msg["value"], float(scale), self.traced)
            if fast is not None:
                self.total = self.total + fast
                return
        log_prob = msg["fn"].log_prob(msg["value"])
        self.total = self.total + scale_and_mask(log_prob, msg["scale"], msg["mask"]).sum()


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_NORMAL_LOG_PROB = Normal.log_prob  # subclasses that override log_prob take the slow path


def _iid_normal_log_prob_sum(
    fn: Any, value: Tensor, factor: float = 1.0, traced: bool = False
) -> Tensor | None:
    """``factor * fn.log_prob(value).sum()`` by one difference and one dot product, else None.

    For a Normal (possibly ``.expand(...).to_event(k)``) whose ``scale`` is one value
    broadcast (stride 0), the shape of ``value``: the usual prior of network weights (``loc``
    one value too: no difference at all when it is a constant 0) and the usual Gaussian
    likelihood with a fixed or latent noise scale. ``Normal.log_prob`` costs five elementwise
    passes and their backward. ``loc`` and ``scale`` keep their autograd graph (hierarchical
    priors and latent noise scales work). ``traced``: tensor arithmetic only, no host reads of
    ``loc`` or ``scale`` (for :func:`torch.fx.experimental.proxy_tensor.make_fx`).
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
        zero = not traced and not loc0.requires_grad and float(loc0) == 0.0
        diff = flat if zero else flat - loc0
    ss = torch.dot(diff, diff)
    if (
        not scale0.requires_grad and not traced
    ):  # a constant: the scalar arithmetic in Python floats
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


def _local_latent_error(site: str, plate: str, plain_function: bool = False) -> ValueError:
    """Return the error for a latent site met inside a subsampled plate.

    ``plain_function``: the model is not a PyroModule. If the site is a ``PyroSample`` of a
    network the function calls, touching the weights before the plate does not help: outside
    the network's own ``forward`` (or a ``pyro_method``), PyroModule draws the prior without a
    Pyro sample site and caches nothing, so the first recorded sample is inside the plate.
    """
    if plain_function:
        return ValueError(
            f"latent site {site!r} is inside the subsampled plate {plate!r}: local latent "
            "variables are not supported. If it is a PyroSample weight of a PyroModule network "
            "that this plain-function model calls, touching the weights in the function before "
            "the plate does not help (outside the network's own forward PyroModule records no "
            "sample site and caches nothing). What works: write the model as a PyroModule that "
            "holds the network as an attribute and whose forward touches its weights before "
            "the plate (pass it to SGLD as the model), or run the function's body under the "
            "network's context (with net._pyro_context: ...); see docs/usage.md, "
            "'Writing models'"
        )
    return ValueError(
        f"latent site {site!r} is inside the subsampled plate {plate!r}: local latent "
        "variables are not supported; sample it outside the data plate (for a PyroModule: "
        "touch its PyroSample weights before entering the plate, see the SGLD docstring)"
    )


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


def _non_finite(value: Any, nan_only: bool = False) -> tuple[str, tuple[int, ...], int] | None:
    """``(kind, index of the first, count)`` of the NaN/inf entries of a float tensor, or None."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() == 0:
        return None
    bad = torch.isnan(value) if nan_only else ~torch.isfinite(value)
    if not bool(bad.any()):
        return None
    index = tuple(int(i) for i in bad.nonzero()[0])
    kind = "NaN" if bool(torch.isnan(value[index])) else "inf"
    return kind, index, int(bad.sum())


def _closed_over(model: Callable[..., Any]) -> list[tuple[str, str, Any]]:
    """Return the tensors a model reads besides its arguments, where they can be found.

    A function's closure and the globals it names; a module's buffers and tensor attributes.
    """
    found: list[tuple[str, str, Any]] = []
    if isinstance(model, nn.Module):
        for module_name, module in model.named_modules():
            for key, value in vars(module).items():
                if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                    path = f"{module_name}.{key}" if module_name else key
                    found.append((path, "tensor attribute of the model", value))
            for key, value in module.named_buffers(recurse=False):
                path = f"{module_name}.{key}" if module_name else key
                found.append((path, "buffer of the model", value))
        return found
    target = getattr(model, "__func__", model)
    if inspect.isfunction(target):
        try:
            cv = inspect.getclosurevars(target)
        except (TypeError, ValueError):  # pragma: no cover - exotic callables
            return found
        found += [(k, "variable the model closes over", v) for k, v in cv.nonlocals.items()]
        found += [(k, "global the model reads", v) for k, v in cv.globals.items()]
    return found


def _check_data(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    """Raise a ValueError naming the tensor and index of the first NaN or inf in the data.

    Checked: the model's arguments (NaN and inf), and for NaN the tensors it reads that can be
    found without running it (a function's closure and the globals it names, a module's buffers
    and tensor attributes, where an infinite bound or mask may be meant). Observed values
    reached only while the model runs are checked when a log density is not finite
    (:func:`_bad_observation`).
    """
    try:
        target = model.forward if isinstance(model, nn.Module) else model
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        names = []
    items = [
        (names[i] if i < len(names) else f"#{i}", f"positional argument {i}", a)
        for i, a in enumerate(args)
    ] + [(k, "keyword argument", v) for k, v in kwargs.items()]
    num_args = len(items)
    items += _closed_over(model)
    for i, (name, kind, value) in enumerate(items):
        bad = _non_finite(value, nan_only=i >= num_args)
        if bad is not None:
            what, index, count = bad
            raise ValueError(
                f"the data contain {what}: {kind} {name!r} (shape {tuple(value.shape)}) at "
                f"index {index} ({count} non-finite values in all); remove or impute them "
                "before sampling"
            )


def _bad_observation(
    observed: list[tuple[str, Tensor, tuple[Any, ...]]], indices: Mapping[str, Tensor]
) -> str | None:
    """Describe the first observed value with NaN/inf entries (site, rows), or None."""
    for name, value, stack in observed:
        bad = _non_finite(value)
        if bad is None:
            continue
        what, index, count = bad
        where = f"at index {index} of the mini-batch"
        for frame in stack:
            idx = indices.get(frame.name)
            if idx is not None and frame.dim is not None and -value.dim() <= frame.dim < 0:
                pos = index[value.dim() + frame.dim]
                where = f"at row {int(idx[pos])} of plate {frame.name!r}"
                break
        return (
            f"the data contain {what}: the observed value of site {name!r} {where} "
            f"({count} non-finite values in this mini-batch); every update whose mini-batch "
            "holds such a row would be rejected; remove or impute them before sampling"
        )
    return None


def _is_identity(t: Transform) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def _prior_spread(
    tr: Any, transforms: Mapping[str, Transform], max_numel: int = 64, draws: int = 32
) -> dict[str, tuple[Tensor, float]]:
    """Per small latent site: the median and a standard deviation of its prior, unconstrained.

    From ``draws`` prior draws (the global random state is restored afterwards, so nothing
    else changes); sites whose prior cannot be sampled are left out.
    """
    out: dict[str, tuple[Tensor, float]] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name, t in transforms.items():
            site = tr.nodes[name]
            if site["value"].numel() > max_numel:
                continue
            try:
                u = t.inv(site["fn"].sample((draws,)))
            except (NotImplementedError, ValueError, RuntimeError):
                continue
            u = u.reshape(draws, -1).double()
            sd = float(u.std(0).median())
            if math.isfinite(sd) and sd > 0.0:
                out[name] = (u.median(0).values.reshape(site["value"].shape), sd)
    return out


class MinibatchPotential:
    r"""The mini-batch log density of a Pyro model and ``grad U_hat``, on the unconstrained space.

    Made from one set-up trace of ``model(*args, **kwargs)`` under ``init_strategy`` (without
    gradients, on the first ``B`` rows of every plate named in a dict ``subsample_size``; on the
    full data when ``subsample_size`` is an int, which must find the plate).

    Calling it, ``potential(z, indices)``, returns ``(lp, grads)``: ``lp`` the mini-batch
    estimate of the log joint (log-det-Jacobians included, the likelihood of the ``B`` rows
    scaled by ``N / B`` as ``pyro.plate`` does) as a float, and ``grads`` the gradient of
    ``U_hat = -lp`` per site.

    Parameters
    ----------
    model : callable
        A Pyro model with continuous latent sites, none inside a subsampled plate.
    args, kwargs
        The model's arguments (the data).
    subsample_size : None, int or dict
        As for :class:`pyro_bnp.SGLD`: ``{plate: B}`` plates the caller feeds with indices, an
        int for the one plate that holds observations, or None.
    init_strategy : callable, optional
        A Pyro init strategy for :attr:`initial_params`; default
        :func:`init_to_median_or_sample`.

    Attributes
    ----------
    initial_params : dict[str, Tensor]
        Unconstrained initial values from ``init_strategy``.
    transforms : dict[str, Transform]
        Per site, the map from the unconstrained to the constrained space.
    plates : dict[str, tuple[int, int]]
        Plates the caller feeds: name -> (size, batch size).
    own_plates : dict[str, tuple[int, int]]
        Plates the model subsamples itself: name -> (size, batch size).
    subsample_size : dict[str, int] or None
        The resolved ``{plate: B}``.
    num_data : float
        ``N``, the number of observations (product of the subsampled plates' sizes).
    priors : dict[str, NormalPrior]
        Sites with a fixed i.i.d. Normal prior on the unconstrained space.
    prior_spread : dict[str, tuple[Tensor, float]]
        Per small site (at most 64 entries), the prior's median and standard deviation on the
        unconstrained space, from 32 prior draws (for the chain-health checks).
    fast_sites : frozenset of str
        Sites taken by the PyroModule cache path (their prior is added in closed form or by
        the prior's ``log_prob``; they never reach Pyro's handlers).

    Raises
    ------
    ValueError
        For NaN in the data, a discrete latent site, a latent site inside a subsampled plate,
        an unknown plate or a batch larger than its plate, or a model without latent sites.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        subsample_size: int | Mapping[str, int] | None = None,
        init_strategy: Callable[..., Any] | None = None,
    ) -> None:
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        _check_data(model, self.args, self.kwargs)
        strategy = init_to_median_or_sample if init_strategy is None else init_strategy
        batch = dict(subsample_size) if isinstance(subsample_size, Mapping) else {}
        plates = _Plates(batch)
        plates.plain_function = not isinstance(model, PyroModule)
        with plates, torch.no_grad():
            tr = trace(InitMessenger(strategy)(model)).get_trace(*self.args, **self.kwargs)
        self.plates: dict[str, tuple[int, int]] = {}
        self.own_plates: dict[str, tuple[int, int]] = {}
        self.subsample_size = self._resolve_plates(subsample_size, plates.seen, tr)
        to_constrained: dict[str, Transform] = {}
        z0: dict[str, Tensor] = {}
        priors: dict[str, NormalPrior] = {}
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
                if frame.name in self.plates or frame.name in self.own_plates:
                    raise _local_latent_error(name, frame.name, plates.plain_function)
            t = biject_to(fn.support)
            to_constrained[name] = t
            value: Tensor = site["value"]  # type: ignore[assignment]
            z0[name] = t.inv(value).detach()
            iid = _iid_normal_constants(fn, value.shape)
            if (
                iid is not None
                and _is_identity(t)
                and isinstance(site["scale"], numbers.Real)
                and site["scale"] == 1.0
                and site["mask"] is None
            ):
                priors[name] = NormalPrior(iid[0], 1.0 / iid[1])
        if not z0:
            raise ValueError("the model has no latent sample sites to sample")
        self.prior_spread = _prior_spread(tr, to_constrained)
        self.initial_params = z0
        self.transforms = to_constrained
        self._identity = {k for k, t in to_constrained.items() if _is_identity(t)}
        self.priors = priors
        self._module_sites = _module_sites(model, tr, z0)
        self.num_data = self._count_data(tr)

    @property
    def identity_sites(self) -> frozenset[str]:
        """Sites whose unconstrained value is the value itself (real support)."""
        return frozenset(self._identity)

    @property
    def fast_sites(self) -> frozenset[str]:
        """Sites fed through the PyroModule cache (empty after a fallback)."""
        return frozenset(self._module_sites)

    # ------------------------------------------------------------------ set-up
    def _resolve_plates(
        self, spec: Any, seen: Mapping[str, tuple[int, int | None]], tr: Any
    ) -> dict[str, int] | None:
        """Fill :attr:`plates` and :attr:`own_plates`; return the resolved ``{plate: B}``."""
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
        for name, (size, sub) in seen.items():
            if sub is not None and sub < size:
                self.own_plates[name] = (size, sub)  # the model subsamples this one itself
        if spec is None:
            return None
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
            self.plates[name] = (size, b)
        return dict(spec)

    def _count_data(self, tr: Any) -> float:
        """Count the observations ``N`` (for RMSprop's per-datum convention)."""
        subsampled = {**self.own_plates, **self.plates}
        if subsampled:
            return float(math.prod(size for size, _ in subsampled.values()))
        best = 1
        for site in tr.nodes.values():
            if site["type"] == "sample" and site["is_observed"] and site["cond_indep_stack"]:
                n = math.prod(f.full_size or f.size for f in site["cond_indep_stack"])
                best = max(best, n)
        return float(best)

    # ------------------------------------------------------------------ indices
    def next_indices(
        self,
        perms: dict[str, Tensor],
        pos: dict[str, int],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Return the next mini-batch of every fed plate (consecutive slices of epochs).

        ``perms`` and ``pos`` (the current permutation and position per plate) are the
        caller's state and are updated; a new permutation is drawn from ``generator`` when an
        epoch has fewer than ``B`` rows left (those rows are skipped).
        """
        out = {}
        for name in sorted(self.plates):
            size, b = self.plates[name]
            at = pos.get(name, size)
            if at + b > size:
                device = None if generator is None else generator.device
                perms[name] = torch.randperm(size, generator=generator, device=device)
                at = 0
            out[name] = perms[name][at : at + b]
            pos[name] = at + b
        return out

    # ------------------------------------------------------------------ evaluation
    def __call__(
        self,
        z: Mapping[str, Tensor],
        indices: Mapping[str, Tensor] | None = None,
        *,
        norms: Mapping[str, float] | None = None,
        hooks: LayerHooks | None = None,
        snapshot: list[tuple[Any, ...]] | None = None,
    ) -> tuple[float, dict[str, Tensor]]:
        """Mini-batch log joint (unconstrained, with log-det-Jacobians) and ``grad U_hat``.

        Parameters
        ----------
        z : Mapping[str, Tensor]
            Unconstrained values of every latent site.
        indices : Mapping[str, Tensor], optional
            Rows of every fed plate (:meth:`next_indices`); default: the first ``B`` rows.
        norms : Mapping[str, float], optional
            The Euclidean norm of each ``z[name]``, if the caller has them (saves a pass).
        hooks : LayerHooks, optional
            Layer statistics to feed during the forward pass (when some are live).
        snapshot : list, optional
            ``hooks.snapshot()`` taken before this call, if the caller took one.
        """
        if indices is None:
            indices = {name: torch.arange(b) for name, (_, b) in sorted(self.plates.items())}
        leaves = {k: v.detach().requires_grad_() for k, v in z.items()}
        values, logdet = self._constrained(leaves)
        sites = self._module_sites
        joint = _LogJoint(values, indices, sites)
        live = hooks is not None and hooks.sync()
        observe = hooks if live else None
        with torch.enable_grad():
            if sites:
                # PyroSample weights: put the values in the module's per-call cache, so their
                # sample statements never run; their log prior is added below.
                ctx: Any = getattr(self.model, "_pyro_context")  # noqa: B009 (typed as Callable)
                if snapshot is None and observe is not None:
                    snapshot = observe.snapshot()
                with ctx:
                    for name, site in sites.items():
                        ctx.cache[site.fullname] = values[name]
                        if site.iid is None:
                            logdet = logdet + site.prior.log_prob(values[name]).sum()
                    self._run_model(joint, observe)
                if joint.bypassed is not None:
                    return self._fallback(joint.bypassed, z, indices, hooks, snapshot)
            else:
                self._run_model(joint, observe)
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
        if not math.isfinite(value):  # a rejected step: is it the data?
            bad = _bad_observation(joint.observed, indices)
            if bad is not None:
                raise ValueError(bad)
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

    def _constrained(self, z: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | float]:
        """Return the constrained values of ``z`` and the sum of their log-det-Jacobians."""
        values: dict[str, Tensor] = {}
        logdet: Tensor | float = 0.0
        for k, v in z.items():
            if k in self._identity:
                values[k] = v
            else:
                t = self.transforms[k]
                x = values[k] = t(v)
                logdet = logdet + t.log_abs_det_jacobian(v, x).sum()
        return values, logdet

    def log_joint(
        self,
        z: Mapping[str, Tensor],
        indices: Mapping[str, Tensor],
        args: tuple[Any, ...] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Return the mini-batch log joint at ``z`` as a tensor, with its autograd graph.

        The same quantity as :meth:`__call__`'s ``lp`` (log-det-Jacobians and the closed-form
        priors of the cache sites included), computed with tensor operations only: no host
        reads and no gradient call, so :func:`torch.func.grad_and_value` and ``make_fx`` can
        trace it (:mod:`pyro_bnp.compiled`). ``args`` and ``kwargs`` replace the model's data
        (a tracer passes its graph inputs). Layer hooks are not fed.

        Raises
        ------
        RuntimeError
            If a cache site reached ``pyro.sample`` (the module cache did not answer as at
            set-up), or the log density does not depend on the latent sites.
        """
        args = self.args if args is None else tuple(args)
        kwargs = self.kwargs if kwargs is None else dict(kwargs)
        values, total = self._constrained(z)
        sites = self._module_sites
        joint = _LogJoint(values, indices, sites, traced=True)
        if sites:
            ctx: Any = getattr(self.model, "_pyro_context")  # noqa: B009 (typed as Callable)
            with ctx:
                for name, site in sites.items():
                    ctx.cache[site.fullname] = values[name]
                with joint:
                    self.model(*args, **kwargs)
            if joint.bypassed is not None:
                raise RuntimeError(
                    f"site {joint.bypassed!r} did not come from the PyroModule cache as at set-up"
                )
            for name, site in sites.items():
                if site.iid is None:
                    total = total + site.prior.log_prob(values[name]).sum()
                    continue
                loc, inv_var, const = site.iid
                d = values[name].reshape(-1)
                d = d if loc == 0.0 else d - loc
                total = total + (const - 0.5 * inv_var * torch.dot(d, d))
        else:
            with joint:
                self.model(*args, **kwargs)
        total = joint.total + total
        if not isinstance(total, Tensor):
            raise RuntimeError("the model's log density does not depend on its latent sites")
        return total

    def _run_model(self, joint: _LogJoint, hooks: LayerHooks | None) -> None:
        if hooks is not None:
            with hooks.active(), joint:
                self.model(*self.args, **self.kwargs)
        else:
            with joint:
                self.model(*self.args, **self.kwargs)

    def _fallback(
        self,
        site: str,
        z: Mapping[str, Tensor],
        indices: Mapping[str, Tensor],
        hooks: LayerHooks | None,
        snapshot: list[tuple[Any, ...]] | None,
    ) -> tuple[float, dict[str, Tensor]]:
        """Evaluate through Pyro's handlers: a cached site reached ``pyro.sample`` after all."""
        warnings.warn(
            f"SGLD: site {site!r} did not come from the PyroModule cache as at set-up; "
            "using the general (slower) path from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        self._module_sites = {}
        if snapshot is not None and hooks is not None:  # forget the discarded run's statistics
            hooks.restore(snapshot)
        return self(z, indices, hooks=hooks)

    def disable_fast_path(self) -> None:
        """Evaluate every site through Pyro's handlers from now on (for tests and debugging)."""
        self._module_sites = {}

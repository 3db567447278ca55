"""Export any :class:`pyro.infer.MCMC` run to an ArviZ :class:`xarray.DataTree`.

:func:`from_pyro` is a drop-in for ArviZ 0.x's ``az.from_pyro`` (same arguments: the run as first
argument or ``posterior=``, ``prior``, ``posterior_predictive``, ``log_likelihood``,
``predictions``, ``constant_data``, ``predictions_constant_data``, ``coords``, ``dims``,
``pred_dims``, ``num_chains``) that returns a ``DataTree`` instead of an ``InferenceData``, and
works for every kernel (NUTS, HMC, :class:`pyro_bnp.SGLD`), with ArviZ's groups and variable
names, built with :func:`arviz_base.dict_to_dataset`, in ArviZ's order:

``posterior``
    The constrained draws ``mcmc.get_samples(group_by_chain=True)``, dims ``(chain, draw, *shape)``
    (or ``samples=``).  Site names are kept as they are, dots included (``"fc1.weight"``).
``posterior_predictive``
    A given mapping (``Predictive(model, mcmc.get_samples())(...)``), or with
    ``posterior_predictive=True`` one draw of every observed site per posterior draw, on the full
    data set, of the observation's shape.
``predictions``, ``predictions_constant_data``
    Given out-of-sample draws and their inputs; their dims come from ``pred_dims`` only (as in
    ArviZ: new data rarely have the coordinates of the old).
``log_likelihood``
    Pointwise ``log p(y_i | theta)`` of every observed site on the FULL data set, even when the
    sampler subsampled, shape ``(chain, draw, *obs_shape)``, without the plate's subsample scale,
    always ``float64`` (PSIS-LOO on float32 values of a few hundred below zero gives NaN).
    Computed by default when possible (ArviZ's default); ``log_likelihood=False`` leaves it out.
``sample_stats``
    From the per-chain dicts that ``kernel.diagnostics()`` returned (``mcmc._diagnostics``).
    Every per-draw entry becomes a ``(chain, draw)`` variable: for SGLD ``lp`` (the kernel's
    minibatch estimate of the log joint, higher is better), ``step_size``, ``grad_norm``,
    ``diverging``.  A list of
    divergent draw indices (Pyro's ``divergences``, used by NUTS and HMC) becomes the boolean
    ``diverging``.  Everything else (NUTS' scalar ``acceptance rate``) is kept as JSON in the
    group attribute ``pyro_diagnostics``: Pyro does not record per-draw acceptance, energy or
    tree depth, so ``acceptance_rate``/``energy`` are absent and energy plots cannot be drawn.
``prior``, ``prior_predictive``
    Given prior draws (``Predictive(model, num_samples=S)(...)``): the model's observed sites (as
    run with the MCMC's arguments) go to ``prior_predictive``, the rest to ``prior``; without a
    model, ArviZ 0.x's rule (keys that are not posterior variables are predictive; without a
    posterior every key is ``prior``).
``observed_data``, ``constant_data``
    Observed site values on the full data set (also without posterior draws, given the model and
    its arguments); user-supplied arrays.

``coords`` and ``dims`` apply to every group but the two predictions groups.  Draws given flat
(``Predictive`` output, or ``samples=`` with ``num_chains=``) are split as ArviZ 0.x does: with a
posterior, ``chain * draw`` draws become ``(chain, draw)``; otherwise ``S`` draws become
``(num_chains, S // num_chains)`` (``num_chains`` defaults to 1) when that divides, else one chain
(with a warning).  The prior always has ``num_chains`` chains of its own.  ``Predictive`` pads
every site to the model's plate nesting (a scalar's draws are ``(S, 1)``); when the model (or the
posterior) gives a site's dimensionality, that padding is dropped; no other size-1 axis is
squeezed (ArviZ 0.x squeezes every size-1 axis of the prior).  Observations may broadcast their
distribution (``Normal(scalar, 1)`` observing a vector): pointwise terms, observed and predicted
values all have the broadcast shape.

How the full data set is evaluated: the model is re-run conditioned on the posterior draws
(:func:`pyro.poutine.condition`) with the *data plate*'s subsample site
(``pyro.poutine.subsample_messenger._Subsample``) set to the indices of one chunk of
``batch_size`` observations at a time.  This works for ``pyro.plate("data", N)`` and for
``pyro.plate("data", N, subsample_size=B)`` provided the model reads its data through the plate's
indices (``y[idx]`` or :func:`pyro.subsample`); for a declared ``subsample_size=B`` Pyro only
accepts index sets of exactly ``B``, so chunks have ``B`` observations (the last one padded and
trimmed).  A model that ignores the indices is evaluated in one chunk.  Draws are evaluated
vectorised (an extra :class:`pyro.plate` over draws, as ``Predictive(parallel=True)`` does, in
blocks of about 65,000 pointwise terms) when that gives the same log-likelihood as running the
model draw by draw, which is checked on the first 5 draws; otherwise (for instance
:class:`~pyro.nn.PyroModule` layers, whose ``F.linear`` does not broadcast over a batch of weights)
draw by draw under :func:`torch.no_grad`.  ``benchmarks/bench_export.py`` measures both: the
vectorised path halves the time of a linear regression and ties with the loop for a 5-20-1 BNN
(about 1.3 s for 1000 draws x 10,000 rows, log-likelihood and predictive, one thread).
The posterior predictive draws each observed site from its distribution given the draw and the
observed data upstream: the usual posterior predictive for exchangeable data; for models where an
observed site feeds later sites (autoregressions) pass ``Predictive`` output as
``posterior_predictive=``.  Instead of an MCMC object, ``samples=`` and ``model=`` can be given.
The draws plate sits left of every plate and of every batch dim a site has beyond them (an
observation that broadcasts its distribution).  By default (``log_likelihood=None``, ArviZ's
"when possible") a model that cannot be evaluated on the draws (latent sites without draws, a
second subsampled plate, an error in the model) loses ``log_likelihood`` with a warning that
gives the error (``observed_data`` is kept when the model runs); ``log_likelihood=True`` raises.

Attributes (root and every group) are netCDF-safe (str, int, float): ``created_at``,
``creation_library`` (``pyro_bnp``) and its version, ``inference_library`` (``pyro``) and its
version, ``torch_version``, ``arviz_base_version``, ``sampler`` (kernel class name),
``sampler_config`` (JSON: ``kernel.config()`` when the kernel has it, else the HMC/NUTS settings),
``num_chains``, ``num_draws`` (the posterior's, when there is one), ``num_warmup``;
diagnostics that are not per draw go to the ``sample_stats`` attribute ``pyro_diagnostics``
(JSON).  So ``dt.to_netcdf(path)`` and
:func:`xarray.open_datatree` round-trip without helpers (engines ``h5netcdf`` and ``netcdf4``).

ArviZ compatibility, checked with arviz-base 0.8.2, arviz-stats 0.8.0, arviz-plots 0.8.0,
arviz 0.23.4, xarray 2026.9, matplotlib 3.10 (``tests/test_arviz.py`` runs ``rhat``, ``ess``,
``summary``, ``loo``, ``plot_ppc_dist``, ``plot_forest``, ``plot_trace``, ``az.plot_ppc``;
``tests/test_arviz_compat.py`` ArviZ 0.x's ``from_pyro`` cases and ``loo`` of an SGLD run):

* arviz_stats on the tree: ``rhat``, ``ess``, ``summary``, ``loo``, ``loo_pit`` work.
* arviz_plots: ``plot_ppc_dist``, ``plot_forest``, ``plot_trace``, ``plot_rank``,
  ``plot_dist``, ``plot_ess``, ``plot_mcse``, ``plot_autocorr``, ``plot_convergence_dist``,
  ``plot_loo_pit``, ``plot_ppc_pit``, ``plot_ppc_tstat``, ``plot_ppc_interval`` and
  ``plot_khat`` (of ``loo(..., pointwise=True)``) work.  They fail: ``plot_trace_dist`` and
  ``plot_rank_dist`` (``PlotCollection.grid`` passes a Dataset to ``xr.Dataset()``, a TypeError
  since xarray 2026), ``plot_pair`` on a variable with string coordinate labels (PandasIndex
  error; integer labels work), ``plot_energy`` (Pyro records no ``energy``).  With matplotlib
  >= 3.11 arviz_plots 0.8 does not import (``matplotlib.style.core`` is gone; hence the pin).
* Legacy ArviZ: ``arviz.from_datatree(dt)`` (present in 0.23) gives an ``InferenceData``;
  ``az.rhat``, ``az.ess``, ``az.summary``, ``az.loo``, ``az.waic``, ``az.plot_ppc``,
  ``plot_trace``, ``plot_forest``, ``plot_posterior``, ``plot_rank``, ``plot_pair``, ``plot_bpv``
  and ``plot_loo_pit(idata, y="obs")`` work; ``plot_energy`` does not (no ``energy``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import xarray as xr
from arviz_base import dict_to_dataset
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_bnp._validate import positive_int

__all__ = ["from_pyro"]

# Elements (draws x pointwise log-likelihood terms) evaluated in one vectorised model run: small
# enough for a hidden layer's activations to stay in cache (measured fastest for a 5-20-1 BNN on
# 10,000 rows, 6 draws a run; a linear regression prefers 4x more, but only by 30%).
_BLOCK_ELEMENTS = 2**16
_DRAWS_PLATE = "_pyro_bnp_draws"
# Diagnostics entries renamed to ArviZ's sample_stats names.
_RENAME = {"acceptance rate": "acceptance_rate", "tree depth": "tree_depth"}
# HMC/NUTS settings reported when the kernel has no ``config()`` method.
_HMC_SETTINGS = (
    "step_size",
    "num_steps",
    "trajectory_length",
    "use_multinomial_sampling",
    "_max_tree_depth",
    "_jit_compile",
    "_max_plate_nesting",
)


# ArviZ's order of groups (``InferenceData``'s supported groups, those from_pyro makes).
_GROUP_ORDER = (
    "posterior",
    "posterior_predictive",
    "predictions",
    "log_likelihood",
    "sample_stats",
    "prior",
    "prior_predictive",
    "observed_data",
    "constant_data",
    "predictions_constant_data",
)
_SAMPLE_DIMS = ["chain", "draw"]


def from_pyro(
    posterior: Any = None,
    *,
    prior: Mapping[str, Any] | None = None,
    posterior_predictive: bool | Mapping[str, Any] | None = None,
    log_likelihood: bool | None = None,
    predictions: Mapping[str, Any] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    predictions_constant_data: Mapping[str, Any] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    pred_dims: Mapping[str, Sequence[str]] | None = None,
    num_chains: int | None = None,
    mcmc: Any = None,
    samples: Mapping[str, Any] | None = None,
    model: Callable[..., Any] | None = None,
    model_args: Sequence[Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    observed_data: bool | None = None,
    diagnostics: Sequence[Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    data_plate: str | None = None,
    vectorize: bool | None = None,
    seed: int | None = None,
) -> xr.DataTree:
    """Convert a Pyro MCMC run and prior/predictive draws into an ArviZ ``DataTree``.

    The arguments up to ``num_chains`` are those of ArviZ 0.x's ``az.from_pyro``, with the same
    meaning; the others are this package's.

    Parameters
    ----------
    posterior : pyro.infer.MCMC or mapping of str to array_like, optional
        A finished run of any kernel (NUTS, HMC, :class:`pyro_bnp.SGLD`).  Its draws, model,
        model arguments, kernel and per-chain diagnostics are read; no kernel method other than
        an optional ``config()`` is called.  A mapping is taken as ``samples``.
    prior : mapping of str to array_like, optional
        Prior draws, e.g. ``pyro.infer.Predictive(model, num_samples=S)(*args)``, each of shape
        ``(S, *shape)``, split into ``num_chains`` chains.  Observed sites of the model (as run
        with the model arguments) go to the ``prior_predictive`` group, the other keys to
        ``prior``.  Without a model: keys that are not posterior variables go to
        ``prior_predictive`` when there are posterior draws, else every key goes to ``prior``.
    posterior_predictive : bool or mapping of str to array_like, optional
        A mapping (e.g. ``Predictive(model, mcmc.get_samples())(*args)``) is stored as given;
        arrays have shape ``(chain, draw, ...)`` or ``(chain * draw, ...)`` (other leading sizes
        are split by ``num_chains``, or stored as one chain with a warning when there are
        posterior draws).  ``True`` draws every observed site once per posterior draw on the
        full data set.  ``None`` or ``False``: no group.
    log_likelihood : bool, optional
        Pointwise log-likelihood of every observed site on the full data set, as ``float64``.
        ``None`` (default) computes it when there are posterior draws and a model, and leaves
        it out with a warning if the model cannot be evaluated; ``True`` raises instead;
        ``False`` leaves it out.
    predictions : mapping of str to array_like, optional
        Out-of-sample draws (e.g. ``Predictive`` on new inputs), shaped as for a
        ``posterior_predictive`` mapping; dims from ``pred_dims``.
    constant_data : mapping of str to array_like, optional
        Arrays stored in the ``constant_data`` group (e.g. the covariates).
    predictions_constant_data : mapping of str to array_like, optional
        Inputs of the predictions, stored in ``predictions_constant_data``; dims from
        ``pred_dims``.
    coords : mapping of str to array_like, optional
        Coordinate values per dimension name, for every group.
    dims : mapping of str to sequence of str, optional
        Dimension names per variable, leaving out ``chain`` and ``draw``; applies to every group
        except the two predictions groups (an observed site's dims name its ``log_likelihood``,
        ``posterior_predictive``, ``prior_predictive`` and ``observed_data`` variables alike).
    pred_dims : mapping of str to sequence of str, optional
        Dimension names per variable of ``predictions`` and ``predictions_constant_data``.
    num_chains : int, optional
        Chains in draws given flat, as ``(chain * draw, ...)``: ``prior`` always (default 1),
        ``posterior_predictive`` and ``predictions`` when there are no posterior draws (default
        1), and ``samples``: with ``num_chains`` they are flat, without they are
        ``(chain, draw, ...)``.  ``S`` draws become ``(num_chains, S // num_chains)`` when
        ``num_chains`` divides ``S``, else one chain (with a warning).  The chains of an MCMC
        run are its own.
    mcmc : pyro.infer.MCMC, optional
        The same as ``posterior`` (this package's older name).
    samples : mapping of str to array_like, optional
        Constrained posterior draws of shape ``(chain, draw, *shape)`` (or flat, see
        ``num_chains``), used instead of ``mcmc``'s.
    model : callable, optional
        The Pyro model, used instead of ``mcmc.kernel.model``.
    model_args, model_kwargs : optional
        Arguments for the model; default those the MCMC run was given.
    observed_data : bool, optional
        The ``observed_data`` group: observed site values on the full data set.  ``None``
        (default) adds it when the model is known; ``True`` raises if the model cannot be run.
    diagnostics : sequence of mapping, optional
        One dict per chain as ``kernel.diagnostics()`` returns, used instead of
        ``mcmc._diagnostics``.
    batch_size : int, optional
        Observations of the data plate per model evaluation (bounds memory); ``None`` evaluates
        the whole plate at once.  Ignored when the model's plate declares a ``subsample_size``
        (its chunks then have that size) or has local latent variables.
    data_plate : str, optional
        Name of the plate over observations that is chunked.  By default the plate around every
        observed site (preferring a plate the kernel subsamples or that declares a
        ``subsample_size``, then the largest).
    vectorize : bool, optional
        ``True`` evaluates draws in a batch (error if that is not exact for this model),
        ``False`` one at a time, ``None`` (default) batches when it matches the draw-by-draw
        result.
    seed : int, optional
        Seed of the posterior predictive draws (the global torch RNG is restored afterwards).

    Returns
    -------
    xarray.DataTree
        Groups, those that apply, in ArviZ's order: ``posterior``, ``posterior_predictive``,
        ``predictions``, ``log_likelihood``, ``sample_stats``, ``prior``, ``prior_predictive``,
        ``observed_data``, ``constant_data``, ``predictions_constant_data``.

    Raises
    ------
    ValueError
        If there is nothing to export, if draws are not shaped as described, if some latent
        sites of the model have no draws (with ``log_likelihood=True`` or
        ``posterior_predictive=True``), or if ``vectorize=True`` is not exact.
    TypeError
        If the run is given twice (``posterior`` and ``mcmc``, or a mapping and ``samples``).

    Warns
    -----
    UserWarning
        If the model of an MCMC run is unknown (a kernel built from a ``potential_fn`` and no
        ``model=``): the groups that need it are left out.  If the model cannot be evaluated and
        ``log_likelihood`` is ``None``.  If ``batch_size`` cannot be honoured because the model
        ignores its plate's indices.  If draws do not split into the chains.

    Examples
    --------
    >>> mcmc = MCMC(NUTS(model), num_samples=500, num_chains=2)  # doctest: +SKIP
    >>> mcmc.run(x, y)  # doctest: +SKIP
    >>> dt = from_pyro(  # doctest: +SKIP
    ...     mcmc,
    ...     prior=Predictive(model, num_samples=500)(x),
    ...     posterior_predictive=Predictive(model, mcmc.get_samples())(x),
    ...     predictions=Predictive(model, mcmc.get_samples())(x_new),
    ...     predictions_constant_data={"x": x_new},
    ...     dims={"obs": ["row"]},
    ...     pred_dims={"obs": ["new_row"]},
    ... )
    """
    if posterior is not None:
        if isinstance(posterior, Mapping):
            if samples is not None:
                raise TypeError("posterior draws given twice: a mapping and samples=")
            samples = posterior
        elif mcmc is not None:
            raise TypeError("the MCMC run given twice: posterior and mcmc=")
        else:
            mcmc = posterior
    if num_chains is not None:
        num_chains = positive_int("num_chains", num_chains)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if posterior_predictive is not None and not isinstance(posterior_predictive, (bool, Mapping)):
        raise TypeError(
            f"posterior_predictive must be a bool or a mapping, got {type(posterior_predictive)}"
        )
    kernel = getattr(mcmc, "kernel", None)
    if model is None:
        model = getattr(kernel, "model", None)
    args = tuple(model_args) if model_args is not None else tuple(getattr(mcmc, "_args", ()) or ())
    kwargs = (
        dict(model_kwargs) if model_kwargs is not None else dict(getattr(mcmc, "_kwargs", {}) or {})
    )

    # --- posterior draws, as (chain, draw, *shape)
    grouped = num_chains is None
    if samples is None and mcmc is not None:
        samples, grouped = mcmc.get_samples(group_by_chain=True), True
    draws: dict[str, np.ndarray] = {}
    shape: tuple[int, int] | None = None
    if samples is not None:
        if not samples:
            raise ValueError("no posterior draws to export")
        if grouped:
            draws = {name: _to_numpy(value) for name, value in samples.items()}
            flat_ = [name for name, value in draws.items() if value.ndim < 2]
            if flat_:
                raise ValueError(
                    f"samples {flat_} are not shaped (chain, draw, ...); for draws shaped "
                    "(draw, ...) pass num_chains="
                )
        else:
            draws = _draw_group(samples, None, num_chains or 1, "posterior")
        shape = _chains_draws(draws, "posterior")

    config = _kernel_config(kernel)
    attrs = _attrs(kernel, config, mcmc, shape)
    dims_: dict[Any, Any] = {k: list(v) for k, v in (dims or {}).items()}
    pred_dims_: dict[Any, Any] = {k: list(v) for k, v in (pred_dims or {}).items()}
    coords_ = dict(coords or {})
    groups: dict[str, xr.Dataset] = {}

    def dataset(
        data: Mapping[str, Any], sample_dims: list[str], var_dims: dict[Any, Any], **kw: Any
    ) -> xr.Dataset:
        return dict_to_dataset(
            data, attrs=dict(attrs), coords=coords_, dims=var_dims, sample_dims=sample_dims, **kw
        )

    if shape is not None:
        groups["posterior"] = dataset(draws, _SAMPLE_DIMS, dims_)
        if diagnostics is None:
            diagnostics = [d for d in getattr(mcmc, "_diagnostics", None) or [] if d is not None]
        stats, extra = _sample_stats(diagnostics, *shape)
        if stats or extra:
            ds = dataset(stats, _SAMPLE_DIMS, dims_)
            if extra:
                ds.attrs["pyro_diagnostics"] = json.dumps(extra, default=repr)
            groups["sample_stats"] = ds

    # --- groups computed from the model: log_likelihood, posterior_predictive, observed_data
    want_pp = posterior_predictive is True
    if shape is None and (want_pp or log_likelihood is True):
        raise ValueError(
            "log_likelihood=True and posterior_predictive=True need posterior draws "
            "(an MCMC run or samples=)"
        )
    want_ll = shape is not None and log_likelihood is not False
    want_obs = observed_data is not False
    if model is None:
        explicit = log_likelihood is True or want_pp or observed_data is True
        if shape is not None and (explicit or (mcmc is not None and (want_ll or want_obs))):
            # e.g. HMC/NUTS built from a potential_fn
            warnings.warn(
                "the model is unknown (pass model=): log_likelihood, posterior_predictive and "
                "observed_data are left out",
                UserWarning,
                stacklevel=2,
            )
    elif want_ll or want_pp or want_obs:
        # a kernel that subsamples one named plate (SGLD(subsample_size={"data": B})) names it
        hinted = getattr(kernel, "subsample_size", None)
        hint = next(iter(hinted)) if isinstance(hinted, Mapping) and hinted else None
        flat: dict[str, Tensor] = {}
        if shape is not None:
            assert samples is not None
            flat = {  # tensors stay on their device
                k: (v.detach() if isinstance(v, Tensor) else torch.as_tensor(draws[k])).reshape(
                    (shape[0] * shape[1],) + draws[k].shape[2:]
                )
                for k, v in samples.items()
            }

        def evaluate(ll: bool, pp: bool) -> _Result:
            with torch.random.fork_rng(devices=[]):  # a subsampling plate draws indices too
                if seed is not None:
                    torch.manual_seed(seed)
                evaluator = _Evaluator(
                    model, args, kwargs, flat, data_plate, hint, batch_size, vectorize, ll or pp
                )
                result = evaluator.run(
                    log_likelihood=ll, posterior_predictive=pp, observed_only=not (ll or pp)
                )
            return result

        result: _Result | None = None
        try:
            result = evaluate(want_ll, want_pp)
        except Exception as err:  # noqa: BLE001 - by default the groups are left out
            strict = log_likelihood is True or want_pp or vectorize is True or bool(data_plate)
            if strict or (not want_ll and observed_data is True):
                raise
            lost = ["log_likelihood"] if want_ll else []
            if want_ll and want_obs:
                try:
                    result = evaluate(False, False)
                except Exception:  # noqa: BLE001
                    if observed_data is True:
                        raise
                    lost.append("observed_data")
            elif want_obs:
                lost.append("observed_data")
            warnings.warn(
                f"{' and '.join(lost)} left out: the model cannot be evaluated "
                f"({type(err).__name__}: {err}); set log_likelihood (observed_data) to False to "
                "skip it quietly, to True to raise the error",
                UserWarning,
                stacklevel=2,
            )
        if result is not None and shape is not None:
            if result.log_likelihood:
                ll = {k: v.reshape(shape + v.shape[1:]) for k, v in result.log_likelihood.items()}
                groups["log_likelihood"] = dataset(ll, _SAMPLE_DIMS, dims_, skip_event_dims=True)
            if want_pp and result.predictive:
                pp = {k: v.reshape(shape + v.shape[1:]) for k, v in result.predictive.items()}
                groups["posterior_predictive"] = dataset(pp, _SAMPLE_DIMS, dims_)
        if result is not None and want_obs and result.observed:
            groups["observed_data"] = dataset(result.observed, [], dims_)

    # --- groups given as draws (Predictive output) or arrays
    sites: _Sites | None = None
    given = (prior, predictions, posterior_predictive if posterior_predictive is not True else None)
    if model is not None and any(isinstance(g, Mapping) for g in given):
        sites = _model_sites(model, args, kwargs)
    # Predictive pads a site's draws with 1s up to the model's plate nesting: (S, 1) for a scalar
    ndims = {k: v.ndim - 2 for k, v in draws.items()} | ({} if sites is None else sites.ndims)
    if isinstance(posterior_predictive, Mapping):
        pp = _draw_group(
            posterior_predictive, shape, num_chains or 1, "posterior_predictive", ndims
        )
        _chains_draws(pp, "posterior_predictive")
        groups["posterior_predictive"] = dataset(pp, _SAMPLE_DIMS, dims_)
    if predictions is not None:
        pred = _draw_group(predictions, shape, num_chains or 1, "predictions", ndims)
        _chains_draws(pred, "predictions")
        groups["predictions"] = dataset(pred, _SAMPLE_DIMS, pred_dims_)
    if prior is not None:
        prior_draws = _draw_group(prior, None, num_chains or 1, "prior", ndims)
        observed = None if sites is None else sites.observed
        parts = _split_prior(prior_draws, observed, None if shape is None else set(draws))
        for group, part in zip(("prior", "prior_predictive"), parts, strict=True):
            if part:
                _chains_draws(part, group)
                groups[group] = dataset(part, _SAMPLE_DIMS, dims_)
    if constant_data is not None:
        const = {k: _to_numpy(v) for k, v in constant_data.items()}
        groups["constant_data"] = dataset(const, [], dims_)
    if predictions_constant_data is not None:
        const = {k: _to_numpy(v) for k, v in predictions_constant_data.items()}
        groups["predictions_constant_data"] = dataset(const, [], pred_dims_)
    if not groups:
        raise ValueError(
            "nothing to export: give an MCMC run (or samples=), prior=, posterior_predictive=, "
            "predictions=, constant_data= or predictions_constant_data="
        )
    tree = xr.DataTree.from_dict({name: groups[name] for name in _GROUP_ORDER if name in groups})
    tree.attrs = dict(attrs)
    return tree


# --------------------------------------------------------------------------------------------
# draws given as arrays
# --------------------------------------------------------------------------------------------


def _draw_group(
    data: Mapping[str, Any],
    shape: tuple[int, int] | None,
    num_chains: int,
    group: str,
    ndims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of draws as ``(chain, draw, ...)``: ArviZ 0.x's reshaping of flat draws.

    With known ``shape`` (the posterior's chains and draws) an array already shaped so is kept
    and one of ``chain * draw`` draws is split; without, ``S`` draws are split into
    ``num_chains`` chains when that divides ``S``.  Anything else becomes one chain.  Size-1
    axes right of ``draw`` beyond the site's own ``ndims[name]`` (``Predictive``'s padding to
    the plate nesting) are dropped.
    """
    out = {}
    for name, value in data.items():
        arr = _to_numpy(value)
        if arr.ndim == 0:
            raise ValueError(f"{group} {name!r} is a scalar, not draws")
        if shape is not None:
            chains, num = shape
            if arr.shape[:2] == shape:
                out[name] = _unpad(arr, name, ndims)
                continue
            if arr.shape[0] == chains * num:
                out[name] = _unpad(arr.reshape(shape + arr.shape[1:]), name, ndims)
                continue
            what = f"the posterior's {chains} x {num} draws"
        else:
            chains = num_chains
            if arr.shape[0] % chains == 0:
                split = arr.reshape((chains, arr.shape[0] // chains) + arr.shape[1:])
                out[name] = _unpad(split, name, ndims)
                continue
            what = f"{chains} chains"
        warnings.warn(
            f"{group} {name!r}: {arr.shape[0]} draws do not match {what}; stored as one chain",
            UserWarning,
            stacklevel=3,
        )
        out[name] = _unpad(arr[None], name, ndims)
    return out


def _unpad(arr: np.ndarray, name: str, ndims: Mapping[str, int] | None) -> np.ndarray:
    """Drop leading size-1 axes of a ``(chain, draw, ...)`` array beyond the site's dims."""
    if ndims is None or name not in ndims:
        return arr
    extra = arr.ndim - 2 - ndims[name]
    if extra <= 0 or any(n != 1 for n in arr.shape[2 : 2 + extra]):
        return arr
    return arr.reshape(arr.shape[:2] + arr.shape[2 + extra :])


def _chains_draws(data: Mapping[str, np.ndarray], group: str) -> tuple[int, int]:
    """Return the common ``(chain, draw)`` sizes of a group's arrays."""
    sizes = {name: tuple(arr.shape[:2]) for name, arr in data.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{group} variables have different (chain, draw) sizes: {sizes}")
    chains, num = next(iter(sizes.values()))
    return int(chains), int(num)


@dataclass
class _Sites:
    ndims: dict[str, int]  # dims of every sample site's value (batch + event)
    observed: list[str]  # observed sites (pyro.deterministic ones left out)


def _model_sites(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> _Sites | None:
    """Sites of one run of the model (``None`` if it does not run with these arguments)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the draws are then taken without the model
        return None
    sites = _Sites({}, [])
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        sites.ndims[name] = torch.as_tensor(site["value"]).dim()
        if (
            site["is_observed"]
            and not (site.get("infer") or {}).get("_deterministic")
            and not _is_factor(site)
        ):
            sites.observed.append(name)
    return sites


def _split_prior(
    prior: Mapping[str, np.ndarray], observed: Sequence[str] | None, posterior: set[str] | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split prior draws into the ``prior`` and ``prior_predictive`` groups."""
    if observed is not None:
        predictive = set(observed)
    elif posterior is not None:  # ArviZ 0.x: what the posterior does not have
        predictive = set(prior) - posterior
    else:
        predictive = set()
    latent = {k: v for k, v in prior.items() if k not in predictive}
    return latent, {k: v for k, v in prior.items() if k in predictive}


# --------------------------------------------------------------------------------------------
# sample_stats and attributes
# --------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
        return np.asarray([_to_numpy(v) for v in value])
    return np.asarray(value)


def _sample_stats(
    diagnostics: Sequence[Mapping[str, Any]], num_chains: int, num_draws: int
) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    """Split per-chain diagnostics into ``(chain, draw)`` arrays and the rest (for attrs)."""
    if len(diagnostics) != num_chains:
        return {}, {}
    stats: dict[str, np.ndarray] = {}
    extra: dict[str, list[Any]] = {}
    keys = [k for k in diagnostics[0] if all(k in d for d in diagnostics)]
    for key in keys:
        values = [d[key] for d in diagnostics]
        if key == "divergences" and "diverging" not in keys:
            diverging = np.zeros((num_chains, num_draws), dtype=bool)
            for chain, idx in enumerate(values):
                idx = np.asarray(_to_numpy(idx), dtype=np.int64).reshape(-1)
                diverging[chain, idx[(idx >= 0) & (idx < num_draws)]] = True
            stats["diverging"] = diverging
            continue
        if key == "divergences":
            continue
        try:
            arrays = [_to_numpy(v) for v in values]
        except (TypeError, ValueError):  # pragma: no cover - exotic diagnostics
            arrays = []
        if arrays and all(a.ndim >= 1 and a.shape[0] == num_draws for a in arrays):
            if len({a.shape for a in arrays}) == 1 and arrays[0].dtype != object:
                stats[_RENAME.get(key, key).replace(" ", "_")] = np.stack(arrays)
                continue
        extra[key] = [_jsonable(v) for v in values]
    return stats, extra


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = _to_numpy(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _kernel_config(kernel: Any) -> dict[str, Any]:
    if kernel is None:
        return {}
    config = getattr(kernel, "config", None)
    if callable(config):
        result = config()
        if isinstance(result, Mapping):
            return {str(k): _jsonable(v) for k, v in result.items()}
    settings: dict[str, Any] = {}
    for name in _HMC_SETTINGS:
        try:
            value = getattr(kernel, name)
        except Exception:  # noqa: BLE001 - properties of half-set-up kernels may raise
            continue
        value = _jsonable(value)
        if isinstance(value, (str, int, float, bool)) or value is None:
            settings[name.lstrip("_")] = value
    adapter = getattr(kernel, "_adapter", None)
    for name in ("target_accept_prob", "adapt_step_size", "adapt_mass_matrix", "is_diag_mass"):
        value = getattr(adapter, name, None)
        if isinstance(value, (int, float, bool)):
            settings[name] = value
    return settings


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _attrs(
    kernel: Any, config: Mapping[str, Any], mcmc: Any, shape: tuple[int, int] | None
) -> dict[str, str | int | float]:
    attrs: dict[str, str | int | float] = {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "creation_library": "pyro_bnp",
        "creation_library_version": _version("pyro_bnp"),
        "creation_library_language": "Python",
        "inference_library": "pyro",
        "inference_library_version": str(pyro.__version__),
        "torch_version": str(torch.__version__),
        "arviz_base_version": _version("arviz-base"),
    }
    if shape is not None:  # the posterior's
        attrs["num_chains"], attrs["num_draws"] = int(shape[0]), int(shape[1])
    warmup = getattr(mcmc, "warmup_steps", None)
    if isinstance(warmup, int):
        attrs["num_warmup"] = warmup
    if kernel is not None:
        attrs["sampler"] = type(kernel).__name__
        attrs["sampler_config"] = json.dumps(dict(config), default=repr)
    return attrs


# --------------------------------------------------------------------------------------------
# full-data evaluation of the model
# --------------------------------------------------------------------------------------------


class _PlateIndices(Messenger):
    """Set the indices of named plates (their ``_Subsample`` sites) to given tensors."""

    def __init__(self, indices: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.indices = indices

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        if isinstance(msg["fn"], _Subsample) and name is not None and name in self.indices:
            msg["value"] = self.indices[name]


@dataclass
class _ObsSite:
    name: str
    axis: int | None  # negative axis of the data plate in the pointwise log-likelihood
    event_dim: int
    lp_shape: tuple[int, ...]  # full-data shape of the pointwise log-likelihood
    value_shape: tuple[int, ...]  # full-data shape of a value (batch + event)


@dataclass
class _Result:
    log_likelihood: dict[str, np.ndarray]
    predictive: dict[str, np.ndarray]
    observed: dict[str, np.ndarray]


@dataclass
class _Chunk:
    start: int
    stop: int
    indices: dict[str, Tensor]  # plate name -> indices (padded to the plate's subsample size)


class _NotVectorizable(Exception):
    pass


class _Evaluator:
    """Re-run a model on the full data set, chunk by chunk, for every posterior draw."""

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        draws: dict[str, Tensor],
        data_plate: str | None,
        data_plate_hint: str | None,
        batch_size: int | None,
        vectorize: bool | None,
        need_draws: bool = True,
    ) -> None:
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.draws = draws  # may be empty: one run, latent sites drawn from the prior
        self.num = next(iter(draws.values())).shape[0] if draws else 1
        self.vectorize = vectorize
        self.need_draws = need_draws  # every latent site needs draws (not for observed_data)
        self.layout = "batch"
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._discover(data_plate, data_plate_hint, batch_size)

    # --- running the model ---------------------------------------------------------------

    def _trace(self, cond: Mapping[str, Tensor], indices: Mapping[str, Tensor]) -> Trace:
        fn = poutine.condition(self.model, data=dict(cond))
        with torch.no_grad(), _PlateIndices(indices):
            return poutine.trace(fn).get_trace(*self.args, **self.kwargs)

    def _trace_vectorized(self, start: int, stop: int, indices: Mapping[str, Tensor]) -> Trace:
        size = stop - start
        cond = {}
        for name, (batch, event) in self.latent_shapes.items():
            value = self.draws[name]
            shape = tuple(batch) + tuple(event)
            # "batch": the layout Pyro gives a site sampled under the draws plate (event dims
            # right of the plate dims); "predictive": Predictive(parallel=True)'s layout, which
            # pads the whole value (what models written for Predictive expect).
            pad = self.nesting - (len(batch) if self.layout == "batch" else len(shape))
            cond[name] = value[start:stop].reshape((size,) + (1,) * max(pad, 0) + shape)
        plate = pyro.plate(_DRAWS_PLATE, size, dim=-self.nesting - 1)
        fn = poutine.condition(plate(self.model), data=cond)
        with torch.no_grad(), _PlateIndices(indices):
            return poutine.trace(fn).get_trace(*self.args, **self.kwargs)

    def _draw(self, i: int) -> dict[str, Tensor]:
        return {name: value[i] for name, value in self.draws.items()}

    # --- discovery -----------------------------------------------------------------------

    def _discover(
        self, data_plate: str | None, data_plate_hint: str | None, batch_size: int | None
    ) -> None:
        trace = self._trace(self._draw(0), {})
        plates: dict[str, _Subsample] = {}
        obs: list[str] = []
        missing: list[str] = []
        self.latent_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        nesting = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            fn: Any = site["fn"]
            if isinstance(fn, _Subsample):
                plates[name] = fn
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
            # batch dims beyond the plates' (a value that broadcasts its distribution, e.g. an
            # observation of shape (10,) of a scalar Normal): the draws plate goes left of them
            nesting = max(nesting, len(_batch_shape(fn, site["value"])))
            infer = site.get("infer") or {}
            if name in self.draws:
                self.latent_shapes[name] = (fn.batch_shape, fn.event_shape)
            elif site["is_observed"]:
                if not infer.get("_deterministic") and not _is_factor(site):
                    obs.append(name)
            else:
                missing.append(name)
        if missing and self.need_draws:
            raise ValueError(
                f"latent sites {missing} of the model have no posterior draws (save_params? "
                "enumerated discrete sites?); export with log_likelihood=False and "
                "posterior_predictive=False"
            )
        self.nesting = nesting
        self.obs_names = obs

        def enclosing(name: str) -> list[str]:
            return [
                f.name
                for f in trace.nodes[name]["cond_indep_stack"]
                if f.vectorized and f.name in plates
            ]

        if data_plate is None and obs:
            common = set(enclosing(obs[0])).intersection(*(enclosing(n) for n in obs[1:]))
            declared = [p for p in common if _declared(plates[p])]
            if data_plate_hint in common:
                data_plate = data_plate_hint
            elif declared:
                data_plate = declared[0]
            elif common:
                data_plate = max(sorted(common), key=lambda p: plates[p].size)
        if data_plate is not None and data_plate not in plates:
            raise ValueError(f"no plate named {data_plate!r} with a size in the model")
        others = [p for p, fn in plates.items() if p != data_plate and _declared(fn)]
        if others:
            raise ValueError(
                f"plates {others} declare a subsample_size; only the data plate "
                f"({data_plate!r}) can be evaluated on the full data set"
            )
        self.plate = data_plate
        self.plate_size = 0 if data_plate is None else plates[data_plate].size
        self.declared = data_plate is not None and _declared(plates[data_plate])
        if data_plate is None:
            self.chunk_len = 0
        elif self.declared:
            self.chunk_len = int(plates[data_plate].subsample_size or 0)
        else:
            self.chunk_len = min(batch_size or self.plate_size, self.plate_size)
        local = [
            n
            for n in self.draws
            if data_plate is not None
            and n in trace.nodes
            and any(f.name == data_plate for f in trace.nodes[n]["cond_indep_stack"])
        ]
        if local:
            if self.declared:
                raise ValueError(
                    f"latent sites {local} are local to the subsampled plate {data_plate!r}: "
                    "their full-data values are unknown"
                )
            self.chunk_len = self.plate_size
        self._probe(batch_size)

    def _chunks(self) -> Iterator[_Chunk]:
        if self.plate is None:
            yield _Chunk(0, 0, {})
            return
        for start in range(0, self.plate_size, self.chunk_len):
            stop = min(start + self.chunk_len, self.plate_size)
            idx = torch.arange(start, stop)
            if self.declared and stop - start < self.chunk_len:
                idx = torch.cat([idx, idx.new_full((self.chunk_len - (stop - start),), stop - 1)])
            yield _Chunk(start, stop, {self.plate: idx})

    def _probe(self, batch_size: int | None) -> None:
        """Find every observed site's full-data shapes from one draw on the first chunk."""
        chunk = next(self._chunks())
        try:
            trace = self._trace(self._draw(0), chunk.indices)
            self.sites = self._site_shapes(trace)
        except (ValueError, RuntimeError, IndexError) as err:
            if self.declared or self.plate is None or self.chunk_len == self.plate_size:
                raise
            if batch_size is not None:
                warnings.warn(
                    f"the model does not evaluate on chunks of plate {self.plate!r} ({err}); "
                    "evaluating the whole plate at once",
                    UserWarning,
                    stacklevel=6,  # _probe, _discover, __init__, evaluate, from_pyro
                )
            self.chunk_len = self.plate_size
            chunk = next(self._chunks())
            trace = self._trace(self._draw(0), chunk.indices)
            self.sites = self._site_shapes(trace)

    def _site_shapes(self, trace: Trace) -> list[_ObsSite]:
        sites = []
        for name in self.obs_names:
            site = trace.nodes[name]
            fn: Any = site["fn"]
            obs = torch.as_tensor(site["value"])
            lp = fn.log_prob(obs)
            event_dim = len(fn.event_shape)
            value_shape = tuple(lp.shape + fn.event_shape)
            axis = next(
                (f.dim for f in site["cond_indep_stack"] if f.name == self.plate and f.vectorized),
                None,
            )
            lp_shape = tuple(lp.shape)
            if axis is not None:
                if lp.dim() < -axis or lp.shape[axis] != self.chunk_len:
                    raise ValueError(
                        f"observed site {name!r} does not follow the indices of plate "
                        f"{self.plate!r} (shape {lp_shape})"
                    )
                lp_shape = _replace(lp_shape, axis, self.plate_size)
                value_shape = _replace(value_shape, axis - event_dim, self.plate_size)
            sites.append(_ObsSite(name, axis, event_dim, lp_shape, value_shape))
        return sites

    # --- evaluation ----------------------------------------------------------------------

    def _extract(
        self, trace: Trace, size: int, chunk: _Chunk, predictive: bool
    ) -> dict[str, tuple[Tensor, Tensor | None, Tensor]]:
        """Per observed site: log-likelihood ``(size, *lp)``, predictive and observed value."""
        out = {}
        for s in self.sites:
            site = trace.nodes[s.name]
            fn: Any = site["fn"]
            obs = torch.as_tensor(site["value"])
            lp = fn.log_prob(obs)
            lp_shape = self._chunk_shape(s.lp_shape, s.axis, chunk)
            value_shape = self._chunk_shape(
                s.value_shape, None if s.axis is None else s.axis - s.event_dim, chunk
            )
            if lp.numel() != size * math.prod(lp_shape):
                raise _NotVectorizable(f"site {s.name!r}: log_prob shape {tuple(lp.shape)}")
            # the observation may broadcast the distribution (Pyro allows it): log_prob has the
            # broadcast batch shape, and so have the observed and the predicted values
            batch = lp.shape
            value = obs.expand(batch + fn.event_shape).reshape((-1,) + value_shape)[0]
            lp = lp.reshape((size,) + lp_shape)
            pred = None
            if predictive:
                pred = (fn if fn.batch_shape == batch else fn.expand(batch)).sample()
                if pred.numel() != size * math.prod(value_shape):
                    raise _NotVectorizable(f"site {s.name!r}: sample shape {tuple(pred.shape)}")
                pred = pred.reshape((size,) + value_shape)
            out[s.name] = (lp, pred, value)
        return out

    def _chunk_shape(
        self, shape: tuple[int, ...], axis: int | None, chunk: _Chunk | None = None
    ) -> tuple[int, ...]:
        if axis is None or self.plate is None:
            return shape
        size = self.chunk_len if chunk is None else len(chunk.indices[self.plate])
        return _replace(shape, axis, size)

    def _sequential(
        self, start: int, stop: int, chunk: _Chunk, predictive: bool
    ) -> dict[str, tuple[Tensor, Tensor | None, Tensor]]:
        parts = [
            self._extract(self._trace(self._draw(i), chunk.indices), 1, chunk, predictive)
            for i in range(start, stop)
        ]
        out = {}
        for name in parts[0]:
            lp = torch.cat([p[name][0] for p in parts])
            preds = [p[name][1] for p in parts]
            pred = None if preds[0] is None else torch.cat([t for t in preds if t is not None])
            out[name] = (lp, pred, parts[0][name][2])
        return out

    def _vectorized(
        self, start: int, stop: int, chunk: _Chunk, predictive: bool
    ) -> dict[str, tuple[Tensor, Tensor | None, Tensor]]:
        try:
            trace = self._trace_vectorized(start, stop, chunk.indices)
            return self._extract(trace, stop - start, chunk, predictive)
        except _NotVectorizable:
            raise
        except Exception as err:  # noqa: BLE001 - any failure means "not vectorisable"
            raise _NotVectorizable(str(err)) from err

    def _choose_mode(self, chunk: _Chunk) -> bool:
        """Whether batched evaluation over draws reproduces the draw-by-draw log-likelihood."""
        if self.vectorize is False:
            return False
        check = min(5, self.num)  # not 1 (broadcasts anything) and rarely a data size
        slow = self._sequential(0, check, chunk, False)
        reasons = []
        for layout in ("batch", "predictive"):
            self.layout = layout
            try:
                fast = self._vectorized(0, check, chunk, False)
            except _NotVectorizable as err:
                reasons.append(f"{layout} layout: {err}")
                continue
            if all(
                torch.allclose(fast[n][0], slow[n][0], rtol=1e-5, atol=1e-6)
                and torch.equal(fast[n][2], slow[n][2])
                for n in slow
            ):
                return True
            reasons.append(f"{layout} layout: differs from draw-by-draw evaluation")
        if self.vectorize:
            raise ValueError(f"vectorize=True, but the model is not vectorisable: {reasons}")
        return False

    def run(
        self, *, log_likelihood: bool, posterior_predictive: bool, observed_only: bool
    ) -> _Result:
        """Evaluate every draw on every chunk; ``observed_only`` needs one draw."""
        num = 1 if observed_only else self.num
        per_draw = sum(math.prod(self._chunk_shape(s.lp_shape, s.axis)) for s in self.sites)
        block = max(1, min(num, _BLOCK_ELEMENTS // max(per_draw, 1)))
        ll: dict[str, np.ndarray] = {}
        pp: dict[str, np.ndarray] = {}
        observed: dict[str, np.ndarray] = {}
        vectorized = None
        for chunk in self._chunks():
            if vectorized is None:
                vectorized = num > 1 and self._choose_mode(chunk)
            step = block if vectorized else 1
            for start in range(0, num, step):
                stop = min(start + step, num)
                parts = None
                if vectorized:
                    try:
                        parts = self._vectorized(start, stop, chunk, posterior_predictive)
                    except _NotVectorizable as err:  # e.g. out of memory on a large block
                        if self.vectorize:
                            raise ValueError(f"vectorised evaluation failed: {err}") from err
                if parts is None:
                    parts = self._sequential(start, stop, chunk, posterior_predictive)
                for s in self.sites:
                    lp, pred, value = parts[s.name]
                    valid = chunk.stop - chunk.start
                    if s.name not in observed:
                        observed[s.name] = np.empty(s.value_shape, dtype=_np_dtype(value))
                        # float64: PSIS-LOO on float32 overflows (exp(300)) and returns NaN
                        ll[s.name] = np.empty((num,) + s.lp_shape, dtype=np.float64)
                    if posterior_predictive and s.name not in pp and pred is not None:
                        pp[s.name] = np.empty((num,) + s.value_shape, dtype=_np_dtype(pred))
                    _put(ll[s.name], slice(start, stop), s.axis, chunk.start, valid, lp)
                    if pred is not None:
                        vaxis = None if s.axis is None else s.axis - s.event_dim
                        _put(pp[s.name], slice(start, stop), vaxis, chunk.start, valid, pred)
                    if start == 0:
                        vaxis = None if s.axis is None else s.axis - s.event_dim
                        _put(observed[s.name], None, vaxis, chunk.start, valid, value)
        return _Result(
            log_likelihood=ll if log_likelihood else {},
            predictive=pp,
            observed=observed,
        )


def _batch_shape(fn: Any, value: Any) -> tuple[int, ...]:
    """Batch shape of ``fn.log_prob(value)``: the distribution's, broadcast with the value's."""
    batch = tuple(fn.batch_shape)
    if not isinstance(value, Tensor):
        return batch
    event_dim = len(fn.event_shape)
    outer = tuple(value.shape[: max(value.dim() - event_dim, 0)])
    try:
        return tuple(torch.broadcast_shapes(batch, outer))
    except RuntimeError:  # the model's own error, raised where the model computes log_prob
        return batch


def _is_factor(site: Mapping[str, Any]) -> bool:
    """Whether a site is a ``pyro.factor`` term (log density, not an observation of data)."""
    return isinstance(site["fn"], dist.Unit)


def _declared(fn: _Subsample) -> bool:
    return fn.subsample_size is not None and fn.subsample_size < fn.size


def _replace(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = size
    return tuple(out)


def _np_dtype(t: Tensor) -> np.dtype[Any]:
    return np.dtype(str(t.dtype).removeprefix("torch."))


def _put(
    out: np.ndarray,
    draws: slice | None,
    axis: int | None,
    start: int,
    valid: int,
    value: Tensor,
) -> None:
    """Write ``value`` (chunk-sized along ``axis``) into ``out`` at observations ``start...``."""
    arr = value.detach().cpu().numpy()
    lead: tuple[slice, ...] = () if draws is None else (draws,)
    if axis is None:
        out[lead] = arr
        return
    pos = arr.ndim + axis
    src = (slice(None),) * pos + (slice(0, valid),)
    dst = lead + (slice(None),) * (pos - len(lead)) + (slice(start, start + valid),)
    out[dst] = arr[src]

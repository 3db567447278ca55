"""Export any :class:`pyro.infer.MCMC` run to an ArviZ :class:`xarray.DataTree`.

:func:`from_pyro` turns a finished MCMC run (NUTS, HMC or :class:`pyro_bnp.SGLD`) into a
``DataTree`` with ArviZ's groups and variable names, built with :func:`arviz_base.dict_to_dataset`:

``posterior``
    The constrained draws ``mcmc.get_samples(group_by_chain=True)``, dims ``(chain, draw, *shape)``.
    Site names are kept as they are, dots included (``"fc1.weight"``).
``sample_stats``
    From the per-chain dicts that ``kernel.diagnostics()`` returned (``mcmc._diagnostics``).
    Every per-draw entry becomes a ``(chain, draw)`` variable: for SGLD ``lp`` (the kernel's
    minibatch estimate of the log joint, higher is better), ``step_size``, ``grad_norm``,
    ``diverging``.  A list of
    divergent draw indices (Pyro's ``divergences``, used by NUTS and HMC) becomes the boolean
    ``diverging``.  Everything else (NUTS' scalar ``acceptance rate``) is kept as JSON in the
    group attribute ``pyro_diagnostics``: Pyro does not record per-draw acceptance, energy or
    tree depth, so ``acceptance_rate``/``energy`` are absent and energy plots cannot be drawn.
``log_likelihood``
    Pointwise ``log p(y_i | theta)`` of every observed site on the FULL data set, even when the
    sampler subsampled, shape ``(chain, draw, *obs_shape)``, without the plate's subsample scale.
``posterior_predictive``
    One draw of every observed site per posterior draw, on the full data set.
``observed_data``, ``constant_data``
    Observed site values on the full data set; user-supplied arrays.

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

Attributes (root and every group) are netCDF-safe (str, int, float): ``created_at``,
``creation_library`` (``pyro_bnp``) and its version, ``inference_library`` (``pyro``) and its
version, ``torch_version``, ``arviz_base_version``, ``sampler`` (kernel class name),
``sampler_config`` (JSON: ``kernel.config()`` when the kernel has it, else the HMC/NUTS settings),
``num_chains``, ``num_draws``, ``num_warmup``; diagnostics that are not per draw go to the
``sample_stats`` attribute ``pyro_diagnostics`` (JSON).  So ``dt.to_netcdf(path)`` and
:func:`xarray.open_datatree` round-trip without helpers (engines ``h5netcdf`` and ``netcdf4``).

ArviZ compatibility, checked with arviz-base 0.8.2, arviz-stats 0.8.0, arviz-plots 0.8.0,
arviz 0.23.4, xarray 2026.9, matplotlib 3.10 (``tests/test_arviz.py`` runs ``rhat``, ``ess``,
``summary``, ``loo``, ``plot_ppc_dist``, ``plot_forest``, ``plot_trace``, ``az.plot_ppc``):

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
import pyro.poutine as poutine
import torch
import xarray as xr
from arviz_base import dict_to_dataset
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace
from torch import Tensor

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


def from_pyro(
    mcmc: Any = None,
    *,
    log_likelihood: bool = True,
    posterior_predictive: bool | Mapping[str, Any] = False,
    observed_data: bool = True,
    constant_data: Mapping[str, Any] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    model_args: Sequence[Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    samples: Mapping[str, Any] | None = None,
    model: Callable[..., Any] | None = None,
    diagnostics: Sequence[Mapping[str, Any]] | None = None,
    data_plate: str | None = None,
    vectorize: bool | None = None,
    seed: int | None = None,
) -> xr.DataTree:
    """Convert a finished Pyro MCMC run into an ArviZ ``DataTree``.

    Parameters
    ----------
    mcmc : pyro.infer.MCMC, optional
        A run of any kernel (NUTS, HMC, :class:`pyro_bnp.SGLD`).  Its draws, model, model
        arguments, kernel and per-chain diagnostics are read; no kernel method other than an
        optional ``config()`` is called.  Leave it out to pass ``samples`` and ``model`` instead.
    log_likelihood : bool, default True
        Add the ``log_likelihood`` group: pointwise log-likelihood of every observed site on the
        full data set.
    posterior_predictive : bool or mapping of str to array_like, default False
        ``True`` draws every observed site once per posterior draw on the full data set.  A mapping
        (e.g. the output of :class:`pyro.infer.Predictive`) is stored as given; arrays have shape
        ``(chain, draw, ...)`` or ``(chain * draw, ...)``.
    observed_data : bool, default True
        Add the ``observed_data`` group (observed site values on the full data set).
    constant_data : mapping of str to array_like, optional
        Arrays stored in the ``constant_data`` group (e.g. the covariates).
    coords : mapping of str to array_like, optional
        Coordinate values per dimension name.
    dims : mapping of str to sequence of str, optional
        Dimension names per variable, leaving out ``chain`` and ``draw``; applies to every group
        (an observed site's dims name its ``log_likelihood``, ``posterior_predictive`` and
        ``observed_data`` variables alike).
    model_args, model_kwargs : optional
        Arguments for the model; default those the MCMC run was given.
    batch_size : int, optional
        Observations of the data plate per model evaluation (bounds memory); ``None`` evaluates the
        whole plate at once.  Ignored when the model's plate declares a ``subsample_size`` (its
        chunks then have that size) or has local latent variables.
    samples : mapping of str to array_like, optional
        Constrained draws of shape ``(chain, draw, *shape)``, used instead of ``mcmc``'s.
    model : callable, optional
        The Pyro model, used instead of ``mcmc.kernel.model``.
    diagnostics : sequence of mapping, optional
        One dict per chain as ``kernel.diagnostics()`` returns, used instead of
        ``mcmc._diagnostics``.
    data_plate : str, optional
        Name of the plate over observations that is chunked.  By default the plate around every
        observed site (preferring a plate the kernel subsamples or that declares a
        ``subsample_size``, then the largest).
    vectorize : bool, optional
        ``True`` evaluates draws in a batch (error if that is not exact for this model), ``False``
        one at a time, ``None`` (default) batches when it matches the draw-by-draw result.
    seed : int, optional
        Seed of the posterior predictive draws (the global torch RNG is restored afterwards).

    Returns
    -------
    xarray.DataTree
        Groups ``posterior``, ``sample_stats`` (when there are diagnostics), and as requested
        ``log_likelihood``, ``posterior_predictive``, ``observed_data``, ``constant_data``.

    Raises
    ------
    ValueError
        If neither ``mcmc`` nor ``samples`` is given, if some latent sites of the model have no
        draws, or if ``vectorize=True`` is not exact.

    Warns
    -----
    UserWarning
        If the model is unknown (a kernel built from a ``potential_fn`` and no ``model=``): the
        groups that need it are left out.  Also if ``batch_size`` cannot be honoured because the
        model ignores its plate's indices.
    """
    kernel = getattr(mcmc, "kernel", None)
    if samples is None:
        if mcmc is None:
            raise ValueError("from_pyro needs an MCMC run or samples=")
        samples = mcmc.get_samples(group_by_chain=True)
    draws = {name: _to_numpy(value) for name, value in samples.items()}
    if not draws:
        raise ValueError("no posterior draws to export")
    num_chains, num_draws = next(iter(draws.values())).shape[:2]
    if model is None:
        model = getattr(kernel, "model", None)
    args = tuple(model_args) if model_args is not None else tuple(getattr(mcmc, "_args", ()) or ())
    kwargs = (
        dict(model_kwargs) if model_kwargs is not None else dict(getattr(mcmc, "_kwargs", {}) or {})
    )
    if diagnostics is None:
        diagnostics = [d for d in getattr(mcmc, "_diagnostics", None) or [] if d is not None]

    config = _kernel_config(kernel)
    attrs = _attrs(kernel, config, mcmc, num_chains, num_draws)
    dims_: dict[Any, Any] = {k: list(v) for k, v in (dims or {}).items()}
    coords = dict(coords or {})
    groups: dict[str, xr.Dataset] = {}

    def dataset(data: Mapping[str, Any], **kw: Any) -> xr.Dataset:
        return dict_to_dataset(data, attrs=dict(attrs), coords=coords, dims=dims_, **kw)

    groups["posterior"] = dataset(draws, sample_dims=["chain", "draw"])
    stats, extra = _sample_stats(diagnostics, num_chains, num_draws)
    if stats or extra:
        ds = dataset(stats, sample_dims=["chain", "draw"])
        if extra:
            ds.attrs["pyro_diagnostics"] = json.dumps(extra, default=repr)
        groups["sample_stats"] = ds

    want_pp = posterior_predictive is True
    if model is None and (log_likelihood or want_pp or observed_data):
        # e.g. HMC/NUTS built from a potential_fn
        warnings.warn(
            "the model is unknown (pass model=): log_likelihood, posterior_predictive and "
            "observed_data are left out",
            UserWarning,
            stacklevel=2,
        )
    elif model is not None and (log_likelihood or want_pp or observed_data):
        # a kernel that subsamples one named plate (SGLD(subsample_size={"data": B})) names it
        hinted = getattr(kernel, "subsample_size", None)
        data_plate_hint = next(iter(hinted)) if isinstance(hinted, Mapping) and hinted else None
        flat = {  # tensors stay on their device
            k: (v.detach() if isinstance(v, Tensor) else torch.as_tensor(draws[k])).reshape(
                (num_chains * num_draws,) + draws[k].shape[2:]
            )
            for k, v in samples.items()
        }
        with torch.random.fork_rng(devices=[]):  # a subsampling plate draws indices too
            if seed is not None:
                torch.manual_seed(seed)
            evaluator = _Evaluator(
                model, args, kwargs, flat, data_plate, data_plate_hint, batch_size, vectorize
            )
            result = evaluator.run(
                log_likelihood=log_likelihood,
                posterior_predictive=want_pp,
                observed_only=not (log_likelihood or want_pp),
            )
        shape = (num_chains, num_draws)
        if log_likelihood and result.log_likelihood:
            ll = {k: v.reshape(shape + v.shape[1:]) for k, v in result.log_likelihood.items()}
            groups["log_likelihood"] = dataset(
                ll, sample_dims=["chain", "draw"], skip_event_dims=True
            )
        if want_pp and result.predictive:
            pp = {k: v.reshape(shape + v.shape[1:]) for k, v in result.predictive.items()}
            groups["posterior_predictive"] = dataset(pp, sample_dims=["chain", "draw"])
        if observed_data and result.observed:
            groups["observed_data"] = dataset(result.observed, sample_dims=[])
    if isinstance(posterior_predictive, Mapping):
        pp = {}
        for k, v in posterior_predictive.items():
            arr = _to_numpy(v)
            if arr.shape[:2] != (num_chains, num_draws):
                arr = arr.reshape((num_chains, num_draws) + arr.shape[1:])
            pp[k] = arr
        groups["posterior_predictive"] = dataset(pp, sample_dims=["chain", "draw"])
    if constant_data is not None:
        groups["constant_data"] = dataset(
            {k: _to_numpy(v) for k, v in constant_data.items()}, sample_dims=[]
        )
    tree = xr.DataTree.from_dict(groups)
    tree.attrs = dict(attrs)
    return tree


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
    kernel: Any, config: Mapping[str, Any], mcmc: Any, num_chains: int, num_draws: int
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
        "num_chains": int(num_chains),
        "num_draws": int(num_draws),
    }
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
    ) -> None:
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.draws = draws
        self.num = next(iter(draws.values())).shape[0]
        self.vectorize = vectorize
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
            infer = site.get("infer") or {}
            if name in self.draws:
                self.latent_shapes[name] = (fn.batch_shape, fn.event_shape)
            elif site["is_observed"]:
                if not infer.get("_deterministic"):
                    obs.append(name)
            else:
                missing.append(name)
        if missing:
            raise ValueError(
                f"latent sites {missing} of the model have no posterior draws (save_params? "
                "enumerated discrete sites?); export with log_likelihood=False, "
                "posterior_predictive=False, observed_data=False"
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
                    stacklevel=5,
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
            obs: Any = site["value"]
            lp = fn.log_prob(obs)
            event_dim = len(fn.event_shape)
            value_shape = tuple(obs.expand(lp.shape + fn.event_shape).shape)
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
            obs: Any = site["value"]
            lp = fn.log_prob(obs)
            lp_shape = self._chunk_shape(s.lp_shape, s.axis, chunk)
            value_shape = self._chunk_shape(
                s.value_shape, None if s.axis is None else s.axis - s.event_dim, chunk
            )
            if lp.numel() != size * math.prod(lp_shape):
                raise _NotVectorizable(f"site {s.name!r}: log_prob shape {tuple(lp.shape)}")
            lp = lp.reshape((size,) + lp_shape)
            value = obs.expand(fn.batch_shape + fn.event_shape)
            value = value.reshape((-1,) + value_shape)[0]
            pred = None
            if predictive:
                pred = fn.sample()
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
                        ll[s.name] = np.empty((num,) + s.lp_shape, dtype=_np_dtype(lp))
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

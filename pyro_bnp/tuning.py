r"""Check SGMCMC draws against the target and choose a step size: kernel Stein discrepancy.

SGLD and SGHMC make no Metropolis correction, so their draws are biased, and the bias grows with
the step size. R-hat and ESS compare chains with each other and measure autocorrelation: a chain
that is stationary around the *wrong* distribution passes them. The kernel Stein discrepancy
(:func:`pyro_bnp.diagnostics.ksd`) compares the draws with the target itself, through its score
``grad log p`` at the draws, which SGMCMC can compute (on the full data) without normalising
constant. This module is the Pyro glue:

* :func:`stein_discrepancy`: the KSD of an MCMC run (or its ArviZ export, or a dict of draws)
  against a model's posterior on Pyro's unconstrained space,
* :func:`tune_step_size`: short runs over a log-spaced grid of step sizes, each scored by
  its KSD (in the spirit of Coullon, South & Nemeth, Statistics and Computing 33, 2023) on
  coordinates standardised by the run's own sd, the step size with the smallest KSD returned.

The numerics are in :mod:`pyro_bnp.diagnostics` (pure torch); docs/step_size.md shows both on a
regression against NUTS.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload

import pyro
import torch
from pyro.infer import MCMC
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor
from tqdm import tqdm

from pyro_bnp._validate import positive_int
from pyro_bnp.diagnostics import DEFAULT_KSD_BLOCK, ksd
from pyro_bnp.potential import MinibatchPotential

__all__ = [
    "DEFAULT_STEP_SIZES",
    "SteinResult",
    "TuningResult",
    "stein_discrepancy",
    "tune_step_size",
]

#: The default grid of :func:`tune_step_size`: ``10^(k/2)`` for ``k = -14, ..., -2``, i.e.
#: 1e-7 to 1e-1 in half decades (13 step sizes).
DEFAULT_STEP_SIZES: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-14, -1))


class SteinResult(NamedTuple):
    """The KSD of a set of draws and what it was computed from (:func:`stein_discrepancy`)."""

    ksd: float
    """The kernel Stein discrepancy (``inf`` if a draw or score is not finite)."""
    draws: Tensor
    """``[n, d]`` the unconstrained draws used (sites flattened in sorted name order)."""
    scores: Tensor
    """``[n, d]`` their scores ``grad log p`` (float64), in the same order."""
    sites: tuple[tuple[str, tuple[int, ...]], ...]
    """``(name, shape)`` of each site, in the order of the columns."""


# --------------------------------------------------------------------------- the draws
def _constrained_draws(source: Any) -> Mapping[str, Any]:
    """Return ``{site: array}`` from an MCMC run, a DataTree, a Dataset or a mapping."""
    if isinstance(source, MCMC):
        return source.get_samples(group_by_chain=True)
    if "xarray" in sys.modules:  # an xarray object can only exist once xarray is imported
        import xarray as xr

        if isinstance(source, xr.DataTree):
            if "posterior" not in source.children:
                raise ValueError("the DataTree has no 'posterior' group")
            source = source["posterior"].to_dataset()
        if isinstance(source, xr.Dataset):
            return {str(k): v.values for k, v in source.data_vars.items()}
    if isinstance(source, Mapping):
        return source
    raise ValueError(
        "source must be a pyro.infer.MCMC run, an xarray.DataTree with a 'posterior' group "
        f"(pyro_bnp.from_pyro), an xarray.Dataset or a dict of draws; got {type(source).__name__}"
    )


def _by_chain(name: str, value: Any, shape: tuple[int, ...]) -> Tensor:
    """``value`` as ``[chain, draw, *shape]``: given so, or as ``[draw, *shape]`` (one chain)."""
    t = torch.as_tensor(value)
    if tuple(t.shape[2:]) == shape and t.dim() == len(shape) + 2:
        return t
    if tuple(t.shape[1:]) == shape and t.dim() == len(shape) + 1:
        return t.unsqueeze(0)
    raise ValueError(
        f"draws of site {name!r} have shape {tuple(t.shape)}; expected (chain, draw, *{shape}) "
        f"or (draw, *{shape})"
    )


def _select(num_chains: int, num_draws: int, thin: int, max_draws: int) -> Tensor:
    """Return indices of pooled ``chain * draw`` rows: thinned per chain, at most ``max_draws``.

    Every chain is thinned by ``thin`` and the chains are pooled (chain 0 first); if more than
    ``max_draws`` rows remain, ``max_draws`` of them are kept, evenly spaced over the pool.
    """
    per_chain = torch.arange(0, num_draws, thin)
    rows = (torch.arange(num_chains)[:, None] * num_draws + per_chain[None, :]).reshape(-1)
    if rows.numel() > max_draws:
        keep = torch.linspace(0, rows.numel() - 1, max_draws).round().long()
        rows = rows[keep]
    return rows


# --------------------------------------------------------------------------- the scores
class _Scorer:
    """Full-data (or large-batch) scores of a model's posterior on the unconstrained space."""

    def __init__(
        self,
        model: Callable[..., Any],
        model_args: Sequence[Any],
        model_kwargs: Mapping[str, Any] | None,
        batch_size: int | Mapping[str, int] | None,
        seed: int,
    ) -> None:
        self.pot = MinibatchPotential(
            model, tuple(model_args), dict(model_kwargs or {}), subsample_size=batch_size
        )
        self.names = sorted(self.pot.initial_params)
        self.shapes = {k: tuple(self.pot.initial_params[k].shape) for k in self.names}
        self.dtypes = {k: self.pot.initial_params[k].dtype for k in self.names}
        self.batched = bool(self.pot.plates)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.perms: dict[str, Tensor] = {}
        self.pos: dict[str, int] = {}

    def unconstrained(self, source: Any, thin: int, max_draws: int) -> dict[str, Tensor]:
        """Per site, ``[n, *shape]`` unconstrained draws (thinned, pooled, capped)."""
        raw = _constrained_draws(source)
        missing = [k for k in self.names if k not in raw]
        if missing:
            raise ValueError(
                f"the draws lack the latent site(s) {missing} of the model; they have {sorted(raw)}"
            )
        draws = {k: _by_chain(k, raw[k], self.shapes[k]) for k in self.names}
        lead = {tuple(v.shape[:2]) for v in draws.values()}
        if len(lead) != 1:
            raise ValueError(f"the sites have different (chain, draw) counts: {sorted(lead)}")
        ((num_chains, num_draws),) = lead
        if num_draws == 0:
            raise ValueError("there are no draws")
        rows = _select(num_chains, num_draws, thin, max_draws)
        out = {}
        with torch.no_grad():
            for k in self.names:
                x = draws[k].reshape(num_chains * num_draws, *self.shapes[k])[rows]
                x = x.to(self.dtypes[k])
                out[k] = self.pot.transforms[k].inv(x)
        return out

    def scores(self, z: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``[n, d]`` flattened draws and their scores (float64), sorted site order."""
        n = next(iter(z.values())).shape[0]
        flat = torch.cat([z[k].reshape(n, -1).double() for k in self.names], dim=1)
        scores = torch.full_like(flat, math.nan)
        finite = torch.isfinite(flat).all(1)
        with pyro.validation_enabled(False):  # an extreme draw: a non-finite score, no error
            for a in range(n):
                if not bool(finite[a]):
                    continue
                indices: dict[str, Tensor] = {}
                if self.batched:
                    indices = self.pot.next_indices(self.perms, self.pos, self.generator)
                _, grads = self.pot({k: z[k][a] for k in self.names}, indices)
                scores[a] = -torch.cat([grads[k].reshape(-1).double() for k in self.names])
        return flat, scores

    def sites(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((k, self.shapes[k]) for k in self.names)


def _standardized(draws: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    r"""Rescale draws and their scores to unit standard deviation per coordinate.

    With ``sd_j`` the standard deviation of column ``j`` of ``draws`` (over the rows), the
    draws become ``z = x / sd`` and the scores ``sd * s``: the score of the target of ``z``
    (``log p_z(z) = log p(sd z) + const``). The KSD of ``(z, sd s)`` is the KSD of the draws
    against the target in those coordinates: zero exactly when the draws of ``x`` converge to
    ``p``, as the unscaled one. A column whose sd is zero or not finite (a frozen coordinate,
    a single draw) keeps scale 1.

    Parameters
    ----------
    draws : Tensor
        ``[n, d]`` draws.
    scores : Tensor
        ``[n, d]`` their scores ``grad log p``.

    Returns
    -------
    tuple of Tensor
        The rescaled draws and scores (float64).

    Raises
    ------
    ValueError
        If the shapes differ or are not ``[n, d]``.
    """
    x = torch.as_tensor(draws).double()
    s = torch.as_tensor(scores).double()
    if x.dim() != 2 or x.shape != s.shape:
        raise ValueError(
            f"draws and scores must both be [n, d], got {tuple(x.shape)} and {tuple(s.shape)}"
        )
    if x.shape[0] < 2:
        return x, s
    sd = x.std(0)
    sd = torch.where(torch.isfinite(sd) & (sd > 0), sd, torch.ones_like(sd))
    return x / sd, s * sd


@overload
def stein_discrepancy(
    source: Any,
    model: Callable[..., Any],
    model_args: Sequence[Any] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    thin: int = 1,
    max_draws: int = 1000,
    batch_size: int | Mapping[str, int] | None = None,
    c: float = 1.0,
    beta: float = -0.5,
    seed: int = 0,
    standardize: bool = False,
    return_scores: Literal[False] = False,
) -> float: ...


@overload
def stein_discrepancy(
    source: Any,
    model: Callable[..., Any],
    model_args: Sequence[Any] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    thin: int = 1,
    max_draws: int = 1000,
    batch_size: int | Mapping[str, int] | None = None,
    c: float = 1.0,
    beta: float = -0.5,
    seed: int = 0,
    standardize: bool = False,
    return_scores: Literal[True],
) -> SteinResult: ...


def stein_discrepancy(
    source: Any,
    model: Callable[..., Any],
    model_args: Sequence[Any] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    thin: int = 1,
    max_draws: int = 1000,
    batch_size: int | Mapping[str, int] | None = None,
    c: float = 1.0,
    beta: float = -0.5,
    seed: int = 0,
    standardize: bool = False,
    return_scores: bool = False,
) -> float | SteinResult:
    r"""Kernel Stein discrepancy of MCMC draws against a Pyro model's posterior.

    The draws are mapped to Pyro's unconstrained space (the inverse of each site's
    ``biject_to(support)``, as the samplers use), where the target is
    ``log p(z) = log p(y | theta(z)) + log p(theta(z)) + log |det d theta / d z|``. Its score at
    every draw is ``-grad U`` of :class:`~pyro_bnp.potential.MinibatchPotential` on the full
    data (``batch_size=None``: one full-data evaluation per draw). The sites are flattened and
    concatenated in sorted name order, the chains pooled, and
    :func:`pyro_bnp.diagnostics.ksd` (IMQ kernel, the square root of the V-statistic) is
    computed from the draws and their scores.

    Parameters
    ----------
    source : pyro.infer.MCMC, xarray.DataTree, xarray.Dataset or dict
        A finished MCMC run (any kernel); the ``DataTree`` of :func:`pyro_bnp.from_pyro` (its
        ``posterior`` group) or that group as a Dataset; or a dict ``{site: draws}`` of
        *constrained* draws shaped ``(chain, draw, *shape)`` or ``(draw, *shape)`` (what
        ``mcmc.get_samples()`` returns). Every latent site of the model must be there; other
        variables (deterministic sites) are ignored.
    model : callable
        The Pyro model the draws are meant to come from.
    model_args, model_kwargs
        The model's arguments (the full data).
    thin : int
        Use every ``thin``-th draw of each chain.
    max_draws : int
        At most this many draws (after thinning, pooled): if there are more, this many evenly
        spaced ones are kept. The cost is ``max_draws`` gradient evaluations plus
        ``O(max_draws^2 d)`` for the KSD.
    batch_size : int, dict or None
        ``None`` (default): full-data scores. Otherwise a ``subsample_size`` as for
        :class:`pyro_bnp.SGLD` (``{"data": B}``): each draw's score is the ``N / B``-scaled
        mini-batch estimate, the draws taking consecutive slices of shuffled epochs of the rows
        (a generator seeded with ``seed``). The noise ``xi_a`` of the scores inflates the
        KSD: with independent batches ``KSD^2`` grows by ``c^(2 beta) E|xi|^2 / n`` in
        expectation (the diagonal of the V-statistic; the off-diagonal terms stay unbiased).
        The slices of an epoch have negatively correlated noise (it sums to zero over the
        epoch), which inflates it less. Use a batch large enough that this is small against
        the values you compare.
    c, beta : float
        The IMQ kernel ``(c^2 + |x - y|^2)^beta`` (default ``c = 1``, ``beta = -1/2``).
    seed : int
        Seed of the mini-batch order when ``batch_size`` is given.
    standardize : bool
        ``False`` (default): the kernel acts on the unconstrained coordinates as they are.
        ``True``: every coordinate is first divided by its standard deviation over the draws
        used, ``z_j = x_j / sd_j`` (a coordinate with zero or non-finite sd keeps scale 1), and
        the KSD is that of the draws ``z_a`` against the correspondingly rescaled target, whose
        score is ``sd_j s_j``. The value is then unchanged by a
        per-coordinate rescaling of the parameters, and every coordinate meets the kernel on
        its length scale ``c``: an error in a wide coordinate is not drowned by the large
        scores of the narrow ones (see :func:`tune_step_size`). The scale is the draws' own,
        so two runs are compared each in its own scale; :func:`tune_step_size` scores this way
        by default.
    return_scores : bool
        Return a :class:`SteinResult` (KSD, draws, scores, sites) instead of the float; the
        draws and scores are the unstandardised ones.

    Returns
    -------
    float or SteinResult
        The KSD (``inf`` if a draw or its score is not finite, e.g. a run that escaped to
        ``exp(z) = inf``).

    Notes
    -----
    What the KSD tells, and what it does not:

    * It compares the draws with the **target including the prior** (the posterior on the
      unconstrained space at temperature 1), not with another sampler's draws; for a
      tempered run (``temperature != 1``) it measures the distance to the untempered posterior.
    * A lower value is better **only at the same number of draws**: even exact draws give
      ``KSD^2 ~ E[k_p(x, x)] / n``. Compare runs with the same ``n`` (``thin``, ``max_draws``).
    * It is **scale dependent**: the kernel has one length scale ``c`` for every coordinate,
      so a posterior much narrower than ``c`` in some direction is seen mostly through the
      scores there. Values are comparable between samplers of one model, not between models.
    * It needs **full-data (or large-batch) gradients** at every draw: ``max_draws`` full
      passes over the data.
    * It does not decompose by site, and a small KSD does not bound the error of a particular
      expectation by a known constant; it goes to zero exactly when the draws converge to the
      target (Gorham & Mackey 2017, for targets with Lipschitz scores and tails at least as
      light as a Gaussian's; beyond those conditions it can miss mass far away).
    * A model whose plates set their own ``subsample_size`` gives mini-batch scores even with
      ``batch_size=None``.

    Raises
    ------
    ValueError
        For a source of an unknown type, draws lacking a latent site or of the wrong shape,
        or invalid ``thin``, ``max_draws``, ``c`` or ``beta``.
    """
    thin = positive_int("thin", thin)
    max_draws = positive_int("max_draws", max_draws)
    scorer = _Scorer(model, model_args, model_kwargs, batch_size, seed)
    z = scorer.unconstrained(source, thin, max_draws)
    flat, scores = scorer.scores(z)
    if standardize:
        value = ksd(*_standardized(flat, scores), c=c, beta=beta, block_size=DEFAULT_KSD_BLOCK)
    else:
        value = ksd(flat, scores, c=c, beta=beta, block_size=DEFAULT_KSD_BLOCK)
    if return_scores:
        return SteinResult(value, flat, scores, scorer.sites())
    return value


# --------------------------------------------------------------------------- the tuner
@dataclass
class TuningResult:
    """The outcome of :func:`tune_step_size`.

    Attributes
    ----------
    step_size : float
        The step size of the smallest score ``ksd`` among the candidate runs (status ``"ok"``
        and an unscaled KSD within ``max_unscaled_ratio`` of the smallest; ``nan`` if no run
        succeeded).
    ksd : float
        Its score (``inf`` if no run succeeded).
    table : list of dict
        One row per step size, in grid order: ``step_size``, ``ksd`` (the score: the KSD on
        standardised coordinates, or the unscaled one with ``standardize=False``; ``inf`` for
        a failed run), ``ksd_unscaled`` (the KSD on the unconstrained coordinates as they are,
        recorded either way), ``candidate`` (``True`` for the runs the choice was made among:
        status ``"ok"`` and within ``max_unscaled_ratio``), ``divergences`` (rejected
        post-warmup draws), ``draws`` (the number the KSD used), ``status`` (``"ok"``,
        ``"divergent: ..."``, ``"failed: <error>"`` or ``"non-finite KSD"``), ``seconds`` (the
        MCMC run), ``ksd_seconds`` and ``warnings`` (the distinct warning messages of the run).
    """

    step_size: float
    ksd: float
    table: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        """Return the table, one line per step size, the chosen one marked with ``*``."""
        head = (
            f"{'':1} {'step_size':>10} {'ksd':>10} {'unscaled':>10} {'div':>5} {'seconds':>8}"
            "  status"
        )
        lines = [head]
        for row in self.table:
            mark = "*" if row["step_size"] == self.step_size else " "
            lines.append(
                f"{mark} {row['step_size']:>10.3g} {row['ksd']:>10.4g} "
                f"{row.get('ksd_unscaled', math.nan):>10.4g} {row['divergences']:>5d} "
                f"{row['seconds']:>8.2f}  {row['status']}"
                + (f" ({len(row['warnings'])} warning(s))" if row["warnings"] else "")
                + (
                    "; not a candidate (unscaled KSD beyond max_unscaled_ratio)"
                    if row["status"] == "ok" and not row.get("candidate", True)
                    else ""
                )
            )
        lines.append(f"chosen step size: {self.step_size:.3g} (KSD {self.ksd:.4g})")
        return "\n".join(lines)


def _divergences(mcmc: MCMC) -> int:
    """Post-warmup divergent draws over all chains (0 if the kernel reports none)."""
    div = mcmc.diagnostics().get("divergences", {})
    return int(sum(len(v) for v in div.values()))


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"failed: {type(error).__name__}: {first}"


def tune_step_size(
    make_kernel: Callable[[float], Any],
    model_args: Sequence[Any] = (),
    *,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    num_samples: int = 500,
    warmup_steps: int = 200,
    thin: int = 1,
    model_kwargs: Mapping[str, Any] | None = None,
    ksd_draws: int = 500,
    num_chains: int = 1,
    max_divergence_fraction: float = 0.05,
    batch_size: int | Mapping[str, int] | None = None,
    record: Callable[[MCMC], Mapping[str, Any]] | None = None,
    progress: bool = True,
    seed: int = 0,
    standardize: bool = True,
    max_unscaled_ratio: float = 10.0,
) -> TuningResult:
    r"""Choose a step size by the kernel Stein discrepancy of short runs over a grid.

    **The rule.** For every step size ``eps`` of ``step_sizes`` (default
    :data:`DEFAULT_STEP_SIZES`, log-spaced from 1e-7 to 1e-1 in half decades) a kernel
    ``make_kernel(eps)`` is run by ``pyro.infer.MCMC`` for ``warmup_steps`` + ``num_samples``
    draws from the same global seed (``pyro.set_rng_seed(seed)`` before each run: the runs
    share their random numbers as far as the sampler allows). Its post-warmup draws are scored
    by :func:`stein_discrepancy` on the full-data score (every ``thin``-th draw, at most
    ``ksd_draws`` of them, evenly spaced), by default (``standardize=True``) with every
    unconstrained coordinate divided by its sd over those draws (the scores multiplied by it).
    Among the runs whose unscaled KSD is at most ``max_unscaled_ratio`` (default 10) times the
    smallest unscaled KSD of the grid, the step size with the smallest score is returned (ties:
    the larger step size). As in Coullon, South & Nemeth (Statistics and Computing 33, 2023),
    every run gets the same budget (here: the same number of updates) and the KSD is computed
    on the same number of draws, so the values are comparable: a too small step size has not
    moved far from the initial point (large KSD), a too large one is biased or diverges (large
    KSD or a failure). A run scores ``inf`` when it raises (an exploding chain,
    ``max_rejections`` rejections in a row, any error: the message is recorded), when more
    than ``max_divergence_fraction`` of its post-warmup draws were rejected, or when its KSD is
    not finite.

    Parameters
    ----------
    make_kernel : callable
        ``step_size -> kernel``, e.g. ``lambda eps: pyro_bnp.SGLD(model, eps,
        subsample_size={"data": 32}, preconditioner="rmsprop")``; any kernel with a ``model``
        attribute (SGLD, SGHMC, every preconditioner). The kernel's own options (its ``thin``,
        batch size, schedule) are whatever ``make_kernel`` sets.
    model_args : sequence
        The model's arguments (the full data), passed to ``MCMC.run`` and to the scores.
    step_sizes : sequence of float
        The grid, tried in the order given.
    num_samples, warmup_steps : int
        Draws per run after and before warmup.
    thin : int
        Use every ``thin``-th post-warmup draw for the KSD (the kernel's own ``thin`` is
        separate: it sets the updates per draw).
    model_kwargs : dict, optional
        The model's keyword arguments.
    ksd_draws : int
        At most this many draws enter the KSD (``ksd_draws`` full-data gradient evaluations
        and ``O(ksd_draws^2 d)`` per run).
    num_chains : int
        Chains per run (pooled for the KSD).
    max_divergence_fraction : float
        Runs with more rejected post-warmup draws than this fraction score ``inf``.
    batch_size : int, dict or None
        Scores from mini-batches of this size instead of the full data (see
        :func:`stein_discrepancy`).
    record : callable, optional
        ``mcmc -> dict``, called with every run that finished sampling; its items become extra
        columns of that run's row (e.g. the largest draw of a scale parameter).
    progress : bool
        Show a tqdm progress bar over the grid.
    seed : int
        Global seed set before each run. The caller's global random state (torch, numpy,
        random) is restored at the end.
    standardize : bool
        Score each run by the KSD of its draws standardised per coordinate (default ``True``;
        see :func:`stein_discrepancy`), or by the KSD on the unconstrained coordinates as they
        are (``False``, this function's earlier rule). With one kernel length scale
        ``c = 1`` for every coordinate the unscaled KSD is dominated by the coordinates with
        the largest scores, the narrowest ones (for exact draws from ``N(m, S)`` its square is
        about ``tr(S^-1) / n``), and an error in the spread of a wider coordinate hardly moves
        it: for ``N(0, diag(1, 0.03^2))`` and 500 draws with the first coordinate's spread
        1.3 times too large, the unscaled KSD is 1.232 against 1.238 for the exact draws, the
        standardised one 0.21 against 0.070 (``tests/test_tuning.py``). docs/step_size.md
        compares both rules against NUTS on the diabetes regression and against the exact
        posterior of a conjugate one.
    max_unscaled_ratio : float
        A run is a candidate only if its unscaled KSD is at most this factor (default 10, an
        order of magnitude; ``inf``: no guard) times the smallest unscaled KSD of the grid.
        The standardisation rescales a chain that has hardly moved from its initial point to
        unit spread as well, so its standardised score stays bounded however far it is from
        the posterior, where the unscaled KSD grows with the distance: at the step size 1e-7
        the models of docs/step_size.md gave standardised scores 0.6-4.3 (against 0.40-0.79 at
        the choice) and unscaled KSDs 78-980, 12-73 times the smallest. The guard keeps
        such runs out; it never excludes the run of the smallest unscaled KSD, so with
        ``standardize=False`` it changes nothing.

    Returns
    -------
    TuningResult
        ``.step_size`` (the best; ``nan`` if every run failed), ``.ksd`` and ``.table``;
        ``print(result)`` shows the table.

    Notes
    -----
    Warnings raised during a run (chain-health findings, a preconditioner's notes such as
    BNP finding no network layers) are caught and recorded in the table, not shown. The KSD
    chooses the step size whose short run is closest to the posterior; it does not certify
    that run, nor a longer one at the chosen step size (whose bias can be checked the same
    way with :func:`stein_discrepancy`). It is blind to the limits listed there.

    Raises
    ------
    ValueError
        For an empty grid, a non-positive step size or invalid counts.
    """
    grid = [float(e) for e in step_sizes]
    if not grid:
        raise ValueError("step_sizes must not be empty")
    bad = [e for e in grid if not (e > 0.0 and math.isfinite(e))]
    if bad:
        raise ValueError(f"step sizes must be positive and finite, got {bad}")
    num_samples = positive_int("num_samples", num_samples)
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    warmup_steps = int(warmup_steps)
    thin = positive_int("thin", thin)
    ksd_draws = positive_int("ksd_draws", ksd_draws)
    num_chains = positive_int("num_chains", num_chains)
    frac = float(max_divergence_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"max_divergence_fraction must be in [0, 1], got {frac!r}")
    ratio = float(max_unscaled_ratio)
    if not ratio >= 1.0:  # inf is allowed: no guard
        raise ValueError(f"max_unscaled_ratio must be >= 1, got {max_unscaled_ratio!r}")
    kwargs = dict(model_kwargs or {})
    args = tuple(model_args)
    table: list[dict[str, Any]] = []
    state = get_rng_state()
    bar = tqdm(grid, desc="tune_step_size", disable=not progress, leave=False)
    try:
        for eps in bar:
            row = _tuning_run(
                make_kernel, eps, args, kwargs, num_samples, warmup_steps, thin, ksd_draws,
                num_chains, frac, batch_size, record, seed, standardize,
            )  # fmt: skip
            table.append(row)
            bar.set_postfix(step_size=f"{eps:.2g}", ksd=f"{row['ksd']:.3g}")
    finally:
        bar.close()
        set_rng_state(state)
    best = _choose(table, ratio)
    if best is None:
        return TuningResult(math.nan, math.inf, table)
    return TuningResult(best["step_size"], best["ksd"], table)


def _choose(table: list[dict[str, Any]], ratio: float) -> dict[str, Any] | None:
    """Mark the candidate rows (``"candidate"``) and return the chosen one (None: no run ok).

    The candidates are the rows with status ``"ok"`` whose ``ksd_unscaled`` is at most
    ``ratio`` times the smallest of those; the choice is the candidate of the smallest
    ``ksd`` (ties: the larger step size).
    """
    ok = [r for r in table if r["status"] == "ok"]
    for r in table:
        r["candidate"] = False
    if not ok:
        return None
    floor = min(r["ksd_unscaled"] for r in ok)
    limit = math.inf if math.isinf(ratio) else ratio * floor  # inf * 0 would be nan
    candidates = [r for r in ok if r["ksd_unscaled"] <= limit]
    for r in candidates:
        r["candidate"] = True
    return min(candidates, key=lambda r: (r["ksd"], -r["step_size"]))


def _tuning_run(
    make_kernel: Callable[[float], Any],
    eps: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    warmup_steps: int,
    thin: int,
    ksd_draws: int,
    num_chains: int,
    frac: float,
    batch_size: int | Mapping[str, int] | None,
    record: Callable[[MCMC], Mapping[str, Any]] | None,
    seed: int,
    standardize: bool,
) -> dict[str, Any]:
    """One run of the grid: sample, count divergences, score; a row of the table."""
    row: dict[str, Any] = {
        "step_size": eps,
        "ksd": math.inf,
        "ksd_unscaled": math.inf,
        "divergences": 0,
        "draws": 0,
        "status": "ok",
        "seconds": 0.0,
        "ksd_seconds": 0.0,
        "warnings": [],
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro.set_rng_seed(seed)
        start = time.perf_counter()
        try:
            kernel = make_kernel(eps)
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=num_chains,
                disable_progbar=True,
            )
            mcmc.run(*args, **kwargs)
        except Exception as error:  # every failure of a run is a result
            row["status"] = _reason(error)
        row["seconds"] = time.perf_counter() - start
        if row["status"] == "ok":
            if record is not None:
                row.update(record(mcmc))
            row["divergences"] = _divergences(mcmc)
            total = num_samples * num_chains
            if row["divergences"] > frac * total:
                row["status"] = (
                    f"divergent: {row['divergences']} of {total} draws rejected "
                    f"(more than {frac:g})"
                )
        if row["status"] == "ok":
            start = time.perf_counter()
            try:
                result = stein_discrepancy(
                    mcmc,
                    kernel.model,
                    args,
                    kwargs,
                    thin=thin,
                    max_draws=ksd_draws,
                    batch_size=batch_size,
                    seed=seed,
                    return_scores=True,
                )
            except Exception as error:
                row["status"] = _reason(error)
            else:
                row["draws"] = int(result.draws.shape[0])
                row["ksd_unscaled"] = result.ksd
                value = result.ksd
                if standardize and math.isfinite(value):
                    value = ksd(
                        *_standardized(result.draws, result.scores), block_size=DEFAULT_KSD_BLOCK
                    )
                row["ksd"] = value
                if not math.isfinite(value):
                    row["status"] = "non-finite KSD"
                    row["ksd"] = math.inf
            row["ksd_seconds"] = time.perf_counter() - start
    messages = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in messages:
            messages.append(text)
    row["warnings"] = messages
    return row

"""Chain state as a value, and the guards every sampler applies to a proposal (pure torch).

:class:`ChainState` holds everything that makes a chain continue exactly: the position, the
cached mini-batch log density and gradient there, the counters, the rejection count, the random
generator and the mini-batch index stream. :meth:`ChainState.to_dict` and
:meth:`ChainState.from_dict` are the checkpoint format (format 1, with the preconditioner's
state added by the kernel). :func:`check_proposal` and :meth:`ChainState.reject` are the guards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ChainState",
    "DrawStats",
    "Health",
    "HealthMonitor",
    "check_proposal",
    "norm",
    "suggest_step_size",
]

FORMAT = 1


def norm(values: Mapping[str, Tensor]) -> float:
    """Euclidean norm over all tensors, one pass each (inf or nan if any entry is not finite)."""
    out = math.hypot(*(float(torch.linalg.vector_norm(v)) for v in values.values()))
    if math.isinf(out) and all(bool(torch.isfinite(v).all()) for v in values.values()):
        # finite entries whose squares overflow: rescale (rare, so the extra passes are fine)
        big = max(float(v.abs().max()) for v in values.values())
        out = big * math.hypot(*(float(torch.linalg.vector_norm(v / big)) for v in values.values()))
    return out


def max_abs(values: Mapping[str, Tensor]) -> float:
    """Largest absolute entry over all tensors (nan if any entry is nan): one reduction each."""
    out = 0.0
    for v in values.values():
        if v.numel():
            m = float(v.abs().max())
            if not m <= out:  # larger, or nan
                out = m
    return out


def suggest_step_size(step_size: float, stable: float = math.inf) -> float:
    """Return the one step size every warning and error of a run suggests trying instead.

    A tenth of the current one, or half of the largest step size the preconditioner calls
    stable (``stable``, e.g. BNP's prior bound ``2 eps / nu``) where that is smaller.
    """
    if not stable > 0.0:  # nan or a non-positive bound: no information
        stable = math.inf
    return min(step_size / 10.0, stable / 2.0)


def check_proposal(
    z: Mapping[str, Tensor],
    max_abs_param: float,
    update: int,
    step_size: float,
    name: str,
    suggest: Callable[[float], float] = suggest_step_size,
) -> tuple[bool, dict[str, float]]:
    """Return ``(finite, norms)`` of a proposal; raise if it exploded past ``max_abs_param``.

    ``norms`` are the Euclidean norms per site (the potential reuses them for closed-form
    priors). ``|theta|_inf <= |theta|_2``, so the cheap norms settle the usual case in one pass
    each; only a large or non-finite one is looked at exactly.

    Raises
    ------
    RuntimeError
        If a finite entry exceeds ``max_abs_param`` (naming the update and the step size
        ``suggest(step_size)`` to try).
    """
    norms = {k: float(torch.linalg.vector_norm(v)) for k, v in z.items()}
    largest = max(norms.values())
    if not largest <= max_abs_param:  # large, or not finite: look exactly
        largest = max_abs(z)
    finite = math.isfinite(largest)
    if finite and largest > max_abs_param:
        raise RuntimeError(
            f"{name}: the chain is exploding: update {update} moved a parameter to "
            f"|theta| = {largest:.3g} > max_abs_param={max_abs_param:g} (step size "
            f"{step_size:.3g}); try a smaller step size, e.g. {suggest(step_size):.2g}"
        )
    return finite, norms


@dataclass
class ChainState:
    """One chain's state (a value: :meth:`to_dict` / :meth:`from_dict` round-trip it).

    Attributes
    ----------
    z : dict[str, Tensor]
        Unconstrained position.
    lp : float
        Mini-batch log joint at ``z`` (the cached evaluation).
    grads : dict[str, Tensor]
        ``grad U_hat`` at ``z`` (same evaluation).
    gnorm : float
        Norm of ``grads``.
    t : int
        Updates done (schedules are evaluated at ``t``).
    draw : int
        Draws returned (warmup included).
    eps : float
        Step size of the last update.
    rejected_in_row : int
        Consecutive rejected updates.
    rng_seed : int
        Seed of :attr:`rng`.
    rng : torch.Generator
        Source of the noise and of the mini-batch permutations.
    perms, pos : dict
        The current permutation and position of every fed plate.
    started : bool
        Whether the first evaluation was done (``lp`` and ``grads`` are valid).
    aux : dict[str, dict[str, Tensor]]
        A sampler's own per-site state, e.g. SGHMC's ``"momentum"`` (saved with the rest).
    """

    z: dict[str, Tensor]
    rng_seed: int
    rng: torch.Generator
    lp: float = math.nan
    grads: dict[str, Tensor] = field(default_factory=dict)
    gnorm: float = math.nan
    t: int = 0
    draw: int = 0
    eps: float = math.nan
    rejected_in_row: int = 0
    perms: dict[str, Tensor] = field(default_factory=dict)
    pos: dict[str, int] = field(default_factory=dict)
    started: bool = False
    aux: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @classmethod
    def new(cls, z: Mapping[str, Tensor], seed: int) -> ChainState:
        """Return a fresh chain at ``z`` with a generator seeded by ``seed``.

        The generator lives on the device of ``z`` (a CUDA generator for parameters on a GPU:
        ``torch.randn`` refuses a CPU generator for a CUDA tensor), so the noise and the
        mini-batch permutations are drawn where the parameters are.
        """
        device = next(iter(z.values())).device if z else torch.device("cpu")
        rng = torch.Generator(device=device).manual_seed(int(seed))
        return cls(z=dict(z), rng_seed=int(seed), rng=rng)

    def accept(
        self, z: dict[str, Tensor], lp: float, grads: dict[str, Tensor], gnorm: float
    ) -> None:
        """Move to an evaluated proposal."""
        self.z, self.lp, self.grads, self.gnorm = z, lp, grads, gnorm
        self.rejected_in_row = 0

    def reject(
        self,
        max_rejections: int,
        name: str,
        suggest: Callable[[float], float] = suggest_step_size,
    ) -> None:
        """Count a rejected update; raise after ``max_rejections`` in a row.

        Raises
        ------
        RuntimeError
            Naming the update and the step size.
        """
        self.rejected_in_row += 1
        if self.rejected_in_row >= max_rejections:
            raise RuntimeError(
                f"{name}: {self.rejected_in_row} updates in a row gave a non-finite log "
                f"density or gradient (last at update {self.t}, step size {self.eps:.3g}); "
                "the step size is probably too large: try a smaller one, e.g. "
                f"{suggest(self.eps):.2g} (or raise max_rejections={max_rejections})"
            )

    def to_dict(self, preconditioner: dict[str, Any] | None) -> dict[str, Any]:
        """Return the checkpoint (format 1): tensors cloned, plus the preconditioner's state."""
        return {
            "format": FORMAT,
            "sites": {k: tuple(v.shape) for k, v in self.z.items()},
            "z": {k: v.detach().clone() for k, v in self.z.items()},
            "started": self.started,
            "lp": self.lp,
            "grads": {k: v.clone() for k, v in self.grads.items()},
            "t": self.t,
            "draw": self.draw,
            "eps": self.eps,
            "rejected_in_row": self.rejected_in_row,
            "rng_seed": self.rng_seed,
            "rng_state": self.rng.get_state(),
            "rng_device": str(self.rng.device),
            "perms": {k: v.clone() for k, v in self.perms.items()},
            "pos": dict(self.pos),
            "preconditioner": preconditioner,
            "aux": {g: {k: v.clone() for k, v in d.items()} for g, d in self.aux.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], like: Mapping[str, Tensor]) -> ChainState:
        """Rebuild a state from :meth:`to_dict`'s output; positions get ``like``'s dtypes.

        Raises
        ------
        ValueError
            If it is not a format 1 state, or its sites or shapes differ from ``like``'s.
        """
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError("load_state_dict: not a pyro_bnp chain state_dict (format 1)")
        expected = {k: tuple(v.shape) for k, v in like.items()}
        if dict(state["sites"]) != expected:
            raise ValueError(
                f"load_state_dict: the saved chain has sites {state['sites']}, this model has "
                f"{expected}"
            )
        rng = torch.Generator(device=state.get("rng_device", "cpu"))
        rng.set_state(state["rng_state"])
        return cls(
            z={k: v.clone().to(like[k].dtype) for k, v in state["z"].items()},
            rng_seed=int(state["rng_seed"]),
            rng=rng,
            lp=float(state["lp"]),
            grads={k: v.clone() for k, v in state["grads"].items()},
            t=int(state["t"]),
            draw=int(state["draw"]),
            eps=float(state["eps"]),
            rejected_in_row=int(state["rejected_in_row"]),
            perms={k: v.clone() for k, v in state["perms"].items()},
            pos=dict(state["pos"]),
            started=bool(state["started"]),
            aux={  # absent in checkpoints of earlier versions
                g: {k: v.clone() for k, v in d.items()} for g, d in state.get("aux", {}).items()
            },
        )

    def __getstate__(self) -> dict[str, Any]:
        out = self.__dict__.copy()
        out["rng"] = self.rng.get_state()
        out["rng_device"] = str(self.rng.device)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng = torch.Generator(device=state.pop("rng_device", "cpu"))
        rng.set_state(state["rng"])
        self.__dict__.update({**state, "rng": rng})


@dataclass
class DrawStats:
    """Per-draw statistics of the post-warmup draws, and warmup divergences."""

    lp: list[float] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    diverging: list[bool] = field(default_factory=list)
    warmup_divergences: int = 0
    last_diverging: bool = False

    def record(self, state: ChainState, diverging: bool, warmup: bool) -> None:
        """Record the draw just made from ``state``."""
        self.last_diverging = diverging
        if warmup:
            self.warmup_divergences += int(diverging)
            return
        self.lp.append(state.lp)
        self.step_size.append(state.eps)
        self.grad_norm.append(state.gnorm)
        self.diverging.append(diverging)


@dataclass(frozen=True)
class Health:
    """Thresholds of the chain-health checks, run every ``every`` draws.

    Cheap: one reduction and one comparison per site per check. Pass ``health=Health(...)``
    to a kernel to change them, ``health=None`` to switch them off. A check that fires warns
    once per site and kind (``RuntimeWarning``) and is recorded in
    ``kernel.diagnostics()["health"]`` (exported to ArviZ with the other diagnostics).

    Attributes
    ----------
    every : int
        Draws between two checks.
    prior_sds : float
        A small site (at most 64 entries) whose unconstrained value is more than this many
        prior standard deviations from the prior's median is running away.
    lp_drop : float
        The median mini-batch log density of the last ``every`` draws fell below the best such
        median by more than this many times that window's median absolute deviation.
    frozen : bool
        Report a site whose value has not changed in ``every`` draws although updates were
        accepted (its preconditioner entries are zero or not finite).
    """

    every: int = 100
    prior_sds: float = 8.0
    lp_drop: float = 20.0
    frozen: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Health: every must be a positive int, got {self.every!r}")
        for name in ("prior_sds", "lp_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"Health: {name} must be positive and finite, got {value!r}")


class HealthMonitor:
    """Runs :class:`Health`'s checks on a chain, draw by draw; collects named events.

    Parameters
    ----------
    health : Health
        The thresholds.
    spread : Mapping[str, tuple[float, float]]
        Per small site, ``(median, standard deviation)`` of its prior on the unconstrained space.
    moves : bool
        Whether a healthy site must move (false at temperature 0, where a site at a stationary
        point legitimately stays).
    """

    def __init__(
        self, health: Health, spread: Mapping[str, tuple[Tensor | float, float]], moves: bool = True
    ) -> None:
        self.health, self.spread, self.moves = health, dict(spread), moves
        self.events: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str]] = set()
        self._lps: list[float] = []
        self._accepted = False
        self._last: dict[str, Tensor] | None = None
        self._best: tuple[float, float] | None = None  # (median, MAD) of the best window

    def observe(
        self,
        chain: ChainState,
        diverging: bool,
        preconditioner_state: Callable[[], Mapping[str, str]],
        advice: Any,
    ) -> list[str]:
        """Record a draw; every ``every`` draws run the checks and return the new messages.

        ``preconditioner_state()``: site -> problem with the preconditioner's state there
        (:meth:`~pyro_bnp.Preconditioner.health`; called only when the checks run: it reads
        the device); ``advice(site)``: a remedy to append.
        """
        self._lps.append(chain.lp)
        self._accepted = self._accepted or not diverging
        if chain.draw % self.health.every:
            return []
        found: list[tuple[str, str, str]] = []
        for site, problem in preconditioner_state().items():
            found.append((site, "preconditioner", problem))
        for site, (centre, sd) in self.spread.items():
            v = chain.z.get(site)
            if v is None or sd <= 0.0:
                continue
            dev = float((v - centre).abs().max()) / sd
            if dev > self.health.prior_sds:
                found.append((site, "runaway", f"it is {dev:.3g} prior standard deviations from "
                              f"its prior's median on the unconstrained scale"))  # fmt: skip
        if self.health.frozen and self.moves and self._last is not None and self._accepted:
            for site, v in chain.z.items():
                old = self._last.get(site)
                if old is not None and torch.equal(old, v):
                    detail = (
                        f"its value has not changed in the last {self.health.every} draws "
                        "although updates were accepted"
                    )
                    found.append((site, "frozen", detail))
        window = sorted(x for x in self._lps if math.isfinite(x))
        if window:
            med = window[len(window) // 2]
            mad = sorted(abs(x - med) for x in window)[len(window) // 2]
            if self._best is not None and med < self._best[0] - self.health.lp_drop * max(
                self._best[1], 1e-12
            ):
                drop = (self._best[0] - med) / max(self._best[1], 1e-12)
                found.append(("log density", "lp_drop", f"the median log density of the last "
                              f"{len(window)} draws fell {drop:.3g} median absolute deviations "
                              f"below its best ({med:.4g} vs {self._best[0]:.4g})"))  # fmt: skip
            if self._best is None or med > self._best[0]:
                self._best = (med, mad)
        self._lps, self._accepted = [], False
        if self.health.frozen and self.moves:
            self._last = {k: v.clone() for k, v in chain.z.items()}
        messages = []
        for site, what, detail in found:
            self.events.append({"site": site, "check": what, "update": chain.t, "detail": detail})
            if (site, what) not in self._seen:
                self._seen.add((site, what))
                hint = advice(site) if site != "log density" else ""
                messages.append(
                    f"chain health: site {site!r} at update {chain.t}: {detail}"
                    + (f"; {hint}" if hint else "")
                )
        return messages

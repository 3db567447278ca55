r"""The Pyro glue: :class:`SGLD`, a :class:`~pyro.infer.mcmc.mcmc_kernel.MCMCKernel`.

The kernel holds options and wires the parts together; it does no numerics of its own:

* :class:`~pyro_bnp.potential.MinibatchPotential` (the model's mini-batch log density and
  gradient, made at :meth:`SGLD.setup`),
* :class:`~pyro_bnp.chain.ChainState` (the chain as a value) and the guards of
  :mod:`pyro_bnp.chain`,
* :func:`~pyro_bnp.integrators.sgld_step` (the update equation) with a
  :class:`~pyro_bnp.preconditioners.Preconditioner` (through its written protocol only),
* :mod:`pyro_bnp.layers` (BNP's layer statistics, their hooks and snapshots).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import torch
from pyro.distributions import is_validation_enabled
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor, nn
from torch.distributions.transforms import Transform

from pyro_bnp._validate import positive_int
from pyro_bnp.chain import (
    ChainState,
    DrawStats,
    Health,
    HealthMonitor,
    check_proposal,
    norm,
    suggest_step_size,
)
from pyro_bnp.compiled import COMPILE_MODES, CompiledUpdate, CompileUnsupported, warn_once
from pyro_bnp.integrators import sgld_step
from pyro_bnp.layers import LayerHooks, find_layers
from pyro_bnp.names import make_preconditioner
from pyro_bnp.potential import MinibatchPotential, init_to_median_or_sample
from pyro_bnp.preconditioners import BindContext, LayerRef, Preconditioner

__all__ = ["SGLD", "init_to_median_or_sample"]

Schedule = Callable[[int], float]


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


def _check_subsample(spec: Any) -> int | dict[str, int] | None:
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        out = {}
        for name, b in spec.items():
            if not isinstance(name, str):
                raise ValueError(
                    f"subsample_size must map plate names (str) to batch sizes, got key {name!r}"
                )
            out[name] = positive_int(f"subsample_size[{name!r}]", b)
        return out
    if isinstance(spec, bool) or not isinstance(spec, numbers.Integral) or spec < 1:
        raise ValueError(
            "subsample_size must be None, a positive int or a dict {plate_name: batch_size}, "
            f"got {spec!r}"
        )
    return int(spec)


def _check_initial_params(params: Any) -> dict[str, Tensor]:
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
    return dict(params)


def _with_user_values(z0: dict[str, Tensor], user: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``z0`` with the user's ``initial_params`` (checked against the sites) put in."""
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
    return z0


def _check_state(z: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    if z.keys() != expected.keys():
        raise ValueError(f"sample() needs the latent sites {sorted(expected)}, got {sorted(z)}")
    for k, v in z.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"sample(): params[{k!r}] has shape {tuple(v.shape)}, the site has "
                f"{tuple(expected[k].shape)}"
            )


def _step_size(step_size: float | Schedule, t: int) -> float:
    """Return the step size at update ``t``: the constant, or the schedule's checked value."""
    if not callable(step_size):
        return step_size
    eps = step_size(t)
    try:
        ok = float(eps) > 0.0 and math.isfinite(float(eps))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"the step size schedule {step_size!r} returned {eps!r} at update {t}; "
            "it must return a positive finite float"
        )
    return float(eps)


def _check_modules(model: Any, modules: Any) -> tuple[nn.Module, ...]:
    """Return the networks BNP reads: ``modules``, or the model if it is an ``nn.Module``."""
    if modules is None:
        return (model,) if isinstance(model, nn.Module) else ()
    out = (modules,) if isinstance(modules, nn.Module) else tuple(modules)
    for m in out:
        if not isinstance(m, nn.Module):
            raise ValueError(f"modules must be nn.Module instances, got {type(m)}")
    return out


def _check_names(names: Any) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"save_params must be a list of site names, got {names!r}")
    return sorted(set(names))


def _check_health(health: Any) -> Health | None:
    if health is not None and not isinstance(health, Health):
        raise ValueError(f"health must be a pyro_bnp.chain.Health or None, got {health!r}")
    return health


def _same_state(
    params: Mapping[str, Tensor], returned: Mapping[str, Tensor] | None, z: Mapping[str, Tensor]
) -> bool:
    """Whether ``params`` is the chain's state ``z``.

    With ``returned`` (the dict the kernel returned last, which Pyro passes back): identity
    checks only, no tensor ops; without: the same sites and equal values.
    """
    if returned is not None:
        return (
            params is returned
            and len(params) == len(z)
            and all(params.get(k) is v for k, v in z.items())
        )
    return params.keys() == z.keys() and all(torch.equal(v, z[k]) for k, v in params.items())


class SGMCMC(MCMCKernel):
    """The Pyro glue every stochastic-gradient kernel shares (a base class, not a sampler).

    Options and their validation, :meth:`setup` (a :class:`~pyro_bnp.potential.MinibatchPotential`
    and a fresh :class:`~pyro_bnp.chain.ChainState`), BNP's layer hooks, the :meth:`sample` loop
    (``thin`` calls of :meth:`_update`, the subclass's update equation), warnings, checkpoints,
    diagnostics and pickling. Its parameters are :class:`SGLD`'s; a subclass adds its own
    options and writes ``_update``, built from :mod:`pyro_bnp.integrators` and the guards of
    :mod:`pyro_bnp.chain` (docs/design.md, "How to add a sampler").
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
        health: Health | None = Health(),  # noqa: B008 (a frozen dataclass: immutable)
        compile: bool | str = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.health = _check_health(health)
        if not any(compile is mode or compile == mode for mode in COMPILE_MODES):
            raise ValueError(f"compile must be False, True, 'auto' or 'trace', got {compile!r}")
        if compile_options is not None and not isinstance(compile_options, Mapping):
            raise ValueError(
                "compile_options must be a dict (inductor options and 'checks'), got "
                f"{compile_options!r}"
            )
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self._graphs: dict[Any, Any] = {}  # traced updates, kept across set-ups of this kernel
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        if callable(step_size):
            self.step_size: float | Schedule = step_size
        else:
            self.step_size = _check_positive("step_size", step_size)
        self.temperature = _check_positive("temperature", temperature, allow_zero=True)
        self.thin = positive_int("thin", thin)
        self.max_rejections = positive_int("max_rejections", max_rejections)
        self.max_abs_param = _check_positive("max_abs_param", max_abs_param)
        self._subsample_spec = _check_subsample(subsample_size)
        self.subsample_size: int | dict[str, int] | None = self._subsample_spec
        self.preconditioner = make_preconditioner(preconditioner)
        if not callable(init_strategy):
            raise ValueError(f"init_strategy must be callable, got {init_strategy!r}")
        self.init_strategy = init_strategy
        self.modules: tuple[nn.Module, ...] = _check_modules(model, modules)
        self._user_initial_params: dict[str, Tensor] | None = None
        self.transforms: dict[str, Transform] | None = None
        self._warned: set[str] = set()  # preconditioner warnings shown (once per kernel)
        self._save_params: list[str] | None = None
        self._resume: dict[str, Any] | None = None  # a state_dict() to continue from
        self._resume_applied = False
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.potential: MinibatchPotential | None = None
        self.chain: ChainState | None = None
        self.layers: tuple[LayerRef, ...] = ()
        self.hooks: LayerHooks | None = None
        self._warmup_steps = 0
        self._initial_params: dict[str, Tensor] | None = None
        self._stats = DrawStats()
        self._returned: dict[str, Tensor] | None = None
        self._monitor: HealthMonitor | None = None
        self._compiled: CompiledUpdate | None = None
        self._compile_failed = False
        self._compile_reason: str | None = None

    @property
    def initial_params(self) -> dict[str, Tensor]:
        """Unconstrained initial parameters of the current chain (set by :meth:`setup`)."""
        if self._initial_params is not None:
            return self._initial_params
        return self._user_initial_params or {}

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        # Checked against the model's sites (names, shapes) by the next :meth:`setup`.
        self._user_initial_params = None if params is None else _check_initial_params(params)

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
        self._save_params = None if names is None else _check_names(names)

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
        seed = int(torch.randint(0, 2**62, ()).item())
        pot = MinibatchPotential(
            self.model,
            args,
            kwargs,
            subsample_size=self._subsample_spec,
            init_strategy=self.init_strategy,
        )
        self.subsample_size = pot.subsample_size
        z0 = _with_user_values(dict(pot.initial_params), self._user_initial_params or {})
        unknown = sorted(set(self._save_params or ()) - set(z0))
        if unknown:
            raise ValueError(
                f"save_params names {unknown}, which are not latent sites; the latent sites "
                f"are {sorted(z0)}"
            )
        # Pyro's convention: ``transforms`` map the constrained space to the unconstrained one.
        self.transforms = {k: t.inv for k, t in pot.transforms.items()}
        self.potential, self._initial_params = pot, z0
        self.chain = ChainState.new(z0, seed)
        if self.health is not None:
            self._monitor = HealthMonitor(self.health, pot.prior_spread, self.temperature > 0)
        # fresh preconditioner state at once (bound again with the layers by the first sample)
        self.preconditioner.bind(BindContext(z0, pot.num_data, (), pot.priors))
        self._resume_applied = False
        if self._resume is not None:
            self._apply_resume_position()

    def _start(self, z: dict[str, Tensor]) -> None:
        """First call to sample(): install hooks, bind the preconditioner, evaluate."""
        pot, chain, pre = self.potential, self.chain, self.preconditioner
        assert pot is not None and chain is not None
        options = pre.layer_options()
        if options is not None:
            # BNP acts on the unconstrained parameters; it is exact only where they are the
            # weights themselves
            layers, hooks = find_layers(self.modules, pot.identity_sites & set(z), **options)
            if layers:
                hooks.install()
                self.layers, self.hooks = tuple(layers), hooks
        pre.bind(BindContext(z, pot.num_data, self.layers, pot.priors))
        resume, self._resume = self._resume, None
        if resume is not None and resume["preconditioner"] is not None:
            pre.load_state_dict(resume["preconditioner"])
        if resume is not None and resume["started"]:
            chain.z, chain.gnorm = z, norm(chain.grads)
        else:
            self._evaluate_at(
                z, "at the initial point is not finite; check init_strategy or initial_params"
            )
        chain.started = True
        if resume is None and self._warmup_steps == 0 and pre.freeze_after_warmup:
            pre.freeze()  # no warmup: frozen from the first update on

    def _evaluate_at(self, z: dict[str, Tensor], what: str) -> None:
        """Evaluate the state ``z`` the chain is asked to continue from; it must be finite."""
        assert self.chain is not None
        lp, grads = self._evaluate(z)
        gnorm = norm(grads)
        if not (math.isfinite(lp) and math.isfinite(gnorm)):
            raise ValueError(f"the log density or its gradient {what} (lp={lp})")
        self.chain.accept(z, lp, grads, gnorm)

    def cleanup(self) -> None:
        """Remove the layer hooks (safe to call more than once)."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    # ------------------------------------------------------------------ the loop
    def _evaluate(
        self,
        z: Mapping[str, Tensor],
        norms: Mapping[str, float] | None = None,
        snapshot: list[tuple[Any, ...]] | None = None,
    ) -> tuple[float, dict[str, Tensor]]:
        """Evaluate the potential at ``z`` on the next mini-batch, feeding the layer hooks."""
        pot, chain = self.potential, self.chain
        assert pot is not None and chain is not None
        indices = pot.next_indices(chain.perms, chain.pos, chain.rng)
        return pot(z, indices, norms=norms, hooks=self.hooks, snapshot=snapshot)

    def _step_size_at(self, t: int) -> float:
        return _step_size(self.step_size, t)

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run ``thin`` updates from ``params`` and return the new unconstrained draw.

        An update whose proposal, log density or gradient is not finite is rejected: the chain
        stays where it was and the draw is flagged ``diverging``. ``max_rejections`` rejections
        in a row raise a ``RuntimeError``. Proposals are evaluated with Pyro's distribution
        validation off (as :class:`~pyro.infer.mcmc.api.MCMC` does by default), so an invalid
        parameter counts as a rejected step rather than an exception.

        The mini-batch log density and gradient of the last returned state are cached; if
        ``params`` is a different state (not what Pyro's samplers pass), it is evaluated anew.
        """
        chain = self.chain
        if chain is None:
            raise RuntimeError(f"{type(self).__name__}.sample() called before setup()")
        returned = _same_state(params, self._returned, chain.z)
        z = chain.z if returned else {k: v.detach() for k, v in params.items()}
        if not chain.started:
            _check_state(z, self._initial_params or {})
            self._start(z)
        elif not returned and not _same_state(z, None, chain.z):
            # not the state this kernel returned last: the cached gradient does not apply
            _check_state(z, self._initial_params or {})
            self._evaluate_at(z, "at the parameters passed to sample() is not finite")
        if chain.draw in (0, self._warmup_steps):  # at the start and after warmup
            self._show_warnings(self._sgld_equivalent(self._step_size_at(chain.t)))
        diverging = self._updates(chain, self.thin)
        chain.draw += 1
        self._returned = out = dict(chain.z)  # a fresh dict: the caller may modify it
        if chain.draw == self._warmup_steps and self.preconditioner.freeze_after_warmup:
            self.preconditioner.freeze()
        self._stats.record(chain, diverging, warmup=chain.draw <= self._warmup_steps)
        if self._monitor is not None:
            state, advice = self.preconditioner.health, self.preconditioner.advice
            for message in self._monitor.observe(chain, diverging, state, advice):
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return out

    def _update(self, chain: ChainState) -> bool:
        """One update of ``chain`` (in place); False if rejected. Each sampler writes its own."""
        raise NotImplementedError

    def _integrator(self) -> str:
        """Return the update equation's name, for the compiled path ("sgld" or "sghmc")."""
        raise NotImplementedError

    def _updates(self, chain: ChainState, num: int) -> bool:
        """Make ``num`` updates (one draw), compiled where possible; True if one was rejected."""
        compiled = self._compiled_update()
        if compiled is not None:
            t0 = chain.t
            try:
                return compiled.run(chain, num)
            except CompileUnsupported as exc:  # the chain is at a valid, evaluated state
                self._stop_compiling(str(exc), unexpected=True)
                chain.gnorm = norm(chain.grads)
                num -= chain.t - t0
        diverging = False
        for _ in range(num):
            diverging = not self._update(chain) or diverging
        return diverging

    def _compiled_update(self) -> CompiledUpdate | None:
        """Return the chain's compiled update (made at the first draw), or None: eager."""
        if self.compile is False or self._compile_failed:
            return None
        if self._compiled is None:
            try:
                self._compiled = CompiledUpdate(self, self.compile, self.compile_options)
            except CompileUnsupported as exc:
                self._stop_compiling(str(exc), unexpected=False)
                return None
            self._compiled.attach(self._graphs)
        return self._compiled

    def _stop_compiling(self, reason: str, unexpected: bool) -> None:
        """Fall back to the eager update for this chain; warn (once per reason)."""
        self._compile_failed, self._compiled = True, None
        self._compile_reason = reason
        if unexpected or self.compile != "auto":
            warn_once(self, reason)

    def _sgld_equivalent(self, step_size: float) -> float:
        """Return the SGLD step size of equal linear stability (for BNP's prior checks)."""
        return step_size

    def _accept_or_reject(self, chain: ChainState, z_new: dict[str, Tensor]) -> bool:
        """Apply the guards: evaluate a proposal, move there if it is finite, else stay.

        A proposal beyond ``max_abs_param`` raises (the chain is exploding); a non-finite one is
        rejected without running the model; a non-finite log density or gradient is rejected
        and its forward pass forgotten by the layer statistics; ``max_rejections`` rejections in
        a row raise.
        """
        name, hooks = type(self).__name__, self.hooks
        finite, norms = check_proposal(
            z_new, self.max_abs_param, chain.t, chain.eps, name, self.suggest_step_size
        )
        snapshot = hooks.snapshot() if finite and hooks is not None and hooks.live else None
        if finite:
            # Validation off (as in Pyro's MCMC): an invalid distribution parameter makes a
            # non-finite log density, i.e. a rejected step, not an exception.
            with (
                pyro.validation_enabled(False)
                if is_validation_enabled()
                else contextlib.nullcontext()
            ):
                lp, grads = self._evaluate(z_new, norms, snapshot)
            gnorm = norm(grads)  # one pass: finiteness check and the recorded norm
            if math.isfinite(lp) and math.isfinite(gnorm):
                chain.accept(z_new, lp, grads, gnorm)
                return True
        if snapshot is not None and hooks is not None:  # forget the proposal's forward pass
            hooks.restore(snapshot)
        chain.reject(self.max_rejections, name, self.suggest_step_size)
        return False

    def suggest_step_size(self, step_size: float) -> float:
        """Return the step size this run's warnings and errors suggest instead of ``step_size``.

        A tenth of it, or half of the preconditioner's stability bound where that is smaller
        (:func:`pyro_bnp.chain.suggest_step_size`): one number, whichever message names it.
        """
        stable = self.preconditioner.stable_step_size(step_size)
        return suggest_step_size(step_size, stable)

    def _show_warnings(self, eps: float) -> None:
        """Show the preconditioner's warnings at this step size, each once per kernel."""
        for key, warning in self.preconditioner.warnings(eps).items():
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(warning, stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue this chain exactly (tensors are cloned).

        The position, the cached mini-batch log density and gradient at it, the update and draw
        counters (so schedules continue), the generator state (noise and mini-batch order), the
        current epoch's permutation and the preconditioner's state (RMSprop's ``V``, BNP's layer
        statistics). Save it with ``torch.save``; continue with :meth:`load_state_dict`.
        """
        chain = self.chain
        if chain is None:
            raise RuntimeError("state_dict() needs a chain: call setup() (or run MCMC) first")
        pre = self.preconditioner.state_dict() if chain.started else None
        return chain.to_dict(pre)

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
        if self._initial_params is not None and self.chain is not None and not self.chain.started:
            self._apply_resume_position()

    def _apply_resume_position(self) -> None:
        state = self._resume
        assert state is not None and self._initial_params is not None
        if self._resume_applied:
            return
        chain = ChainState.from_dict(state, like=self._initial_params)
        chain.started = False  # the first sample() takes the saved evaluation (see _start)
        self._initial_params = dict(chain.z)
        self._warmup_steps += chain.draw  # warmup_steps counts the remaining warmup
        self.chain = chain
        self._resume_applied = True

    def last_draw_stats(self) -> dict[str, Any]:
        """Statistics of the draw :meth:`sample` returned last (for hooks that stream draws).

        ``lp``, ``step_size``, ``grad_norm``, ``diverging`` and ``warmup`` (True during warmup).
        """
        chain = self.chain
        if chain is None:
            raise RuntimeError("last_draw_stats() needs a chain: call setup() first")
        return {
            "lp": chain.lp,
            "step_size": chain.eps,
            "grad_norm": chain.gnorm,
            "diverging": self._stats.last_diverging,
            "warmup": chain.draw <= self._warmup_steps,
        }

    # ------------------------------------------------------------------ reporting
    def logging(self) -> OrderedDict[str, str]:
        """Progress bar fields: step size, mini-batch log density, divergences."""
        st, chain = self._stats, self.chain
        n_div = sum(st.diverging) + st.warmup_divergences
        eps, lp = (math.nan, math.nan) if chain is None else (chain.eps, chain.lp)
        return OrderedDict([("step size", f"{eps:.2e}"), ("lp", f"{lp:.4g}"), ("div", str(n_div))])

    def diagnostics(self) -> dict[str, Any]:
        """Per-draw statistics of the post-warmup draws, the same keys for every chain.

        ``lp`` (mini-batch estimate of the log joint at the draw, unconstrained space),
        ``step_size`` (of the draw's last update, so schedules can be checked),
        ``grad_norm`` (of ``grad U_hat``), ``diverging`` (a rejected update within the draw),
        ``divergences`` (post-warmup draw indices, as Pyro's ``MCMC.summary`` counts them),
        ``warmup_divergences``, ``rng_seed`` (the chain's generator seed), ``health`` (the
        chain-health events: site, check, update, detail; :class:`pyro_bnp.chain.Health`) and
        ``compile`` (:meth:`compile_report`).
        """
        st = self._stats
        return {
            "lp": list(st.lp),
            "step_size": list(st.step_size),
            "grad_norm": list(st.grad_norm),
            "diverging": list(st.diverging),
            "divergences": [i for i, d in enumerate(st.diverging) if d],
            "warmup_divergences": st.warmup_divergences,
            "rng_seed": 0 if self.chain is None else self.chain.rng_seed,
            "health": [] if self._monitor is None else list(self._monitor.events),
            "compile": self.compile_report(),
        }

    def compile_report(self) -> dict[str, Any]:
        """Return what the ``compile=`` path did for the current chain.

        ``mode`` (the argument, as text), ``compiled`` (whether the updates run compiled),
        ``fallback`` (why they run eagerly: ``"compile=False"``, the reason the warning gave,
        even under ``"auto"``, which does not warn, or ``"not started"`` before the first
        draw; None when compiled), ``verified`` (the first accepted update matched the eager
        potential), ``checks`` (``"host"`` or ``"device"``), ``unroll``, ``trace_s`` and
        ``inductor_s`` (compile times; None where not taken).
        """
        c = self._compiled
        if c is None:
            if self.compile is False:
                fallback: str | None = "compile=False"
            else:
                fallback = self._compile_reason or "not started"
            return {"mode": repr(self.compile), "compiled": False, "fallback": fallback,
                    "verified": False, "checks": None, "unroll": 1, "trace_s": None,
                    "inductor_s": None}  # fmt: skip

        def seconds(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 3)

        return {"mode": repr(self.compile), "compiled": True, "fallback": None,
                "verified": c.verified, "checks": "host" if c.host_checks else "device",
                "unroll": c.unroll, "trace_s": seconds(c.trace_seconds),
                "inductor_s": seconds(c.compile_seconds)}  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        # Pyro's chains in spawned processes unpickle the kernel in a fresh interpreter, which
        # does not inherit torch.set_num_threads: the kernel carries it along (measured: 4
        # spawned chains at torch's default threads ran 10-16x slower than at one thread each).
        state = {**self.__dict__, "_torch_threads": torch.get_num_threads()}
        state.update(_graphs={}, _compiled=None)  # compiled graphs are rebuilt, not pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        threads = state.pop("_torch_threads", None)
        self.__dict__.update(state)
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def config(self) -> dict[str, Any]:
        """Return the kernel's settings, for export attributes."""
        return {
            "kernel": type(self).__name__,
            "step_size": repr(self.step_size),
            "preconditioner": repr(self.preconditioner),
            "temperature": self.temperature,
            "thin": self.thin,
            "subsample_size": repr(self.subsample_size),
            "rng_seed": 0 if self.chain is None else self.chain.rng_seed,
            "compile": repr(self.compile),
        }


class SGLD(SGMCMC):
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
        SGLD), another name of :data:`pyro_bnp.names.PRECONDITIONERS` (``"bnp-others"``,
        ``"bnp-cap"``, ``"bnp-frozen"``) or an instance such as :class:`pyro_bnp.RMSprop`.
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
    health : pyro_bnp.Health or None
        Thresholds of the chain-health checks (a site that runs away or stops moving, a log
        density that falls far below its best, broken preconditioner state), run every
        ``health.every`` draws; each finding warns once, naming the site, and is recorded in
        ``diagnostics()["health"]``. None switches them off.
    compile : bool or str
        ``False`` (default): the eager update. ``True``: one compiled graph per update
        (:mod:`pyro_bnp.compiled`: ``make_fx`` of the whole update over the unchanged model, then
        inductor), with the eager update as fallback and a warning (once) that says why.
        ``"auto"``: the same, but silent where the preconditioner has no compiled form (a class
        of your own, or a subclass of ours); ``"trace"``: the traced graph without inductor
        (for debugging). Compiled: every built-in preconditioner (``"identity"``,
        ``"rmsprop"``, ``"bnp"``, ``"bnp+rmsprop"``, ``"bnp-others"``, ``BNP(prior_cap=...)``).
        The chain is the eager one within float rounding (docs/usage.md, "Compiled updates").
    compile_options : dict, optional
        Inductor options (``torch._inductor.config``) and ``"checks"``: ``"host"``, ``"device"``
        or ``"auto"`` (where the guards are read; :class:`pyro_bnp.compiled.CompiledUpdate`).

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

    The parts are public: :attr:`potential` (the model's mini-batch log density, a
    :class:`~pyro_bnp.potential.MinibatchPotential`), :attr:`chain` (the
    :class:`~pyro_bnp.chain.ChainState`), :attr:`layers` and :attr:`hooks` (BNP's layer
    statistics); the update itself is :func:`pyro_bnp.integrators.sgld_step`.

    Examples
    --------
    >>> kernel = SGLD(model, step_size=1e-4, subsample_size={"data": 128})  # doctest: +SKIP
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=500, warmup_steps=500)  # doctest: +SKIP
    >>> mcmc.run(x, y)  # doctest: +SKIP
    """

    def _integrator(self) -> str:
        return "sgld"

    def _update(self, chain: ChainState) -> bool:
        """One SGLD update of ``chain`` (in place); False if the proposal was rejected."""
        eps = chain.eps = self._step_size_at(chain.t)
        self.preconditioner.update(chain.grads, eps)
        z_new = sgld_step(
            self.preconditioner, chain.z, chain.grads, eps, self.temperature, chain.rng
        )
        chain.t += 1
        return self._accept_or_reject(chain, z_new)

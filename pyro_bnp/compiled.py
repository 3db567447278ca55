r"""The compiled update of the SG-MCMC kernels (their ``compile=`` argument).

Used by :class:`~pyro_bnp.SGLD` and :class:`~pyro_bnp.SGHMC`.

One update, from the preconditioner's adaptation to the gradient at the proposal, becomes one
graph. The mechanism was chosen by measurement (docs/compile_spike.md): ``make_fx`` (real-tensor
proxy tracing) of a pure function that calls :func:`torch.func.grad_and_value` of
:meth:`MinibatchPotential.log_joint <pyro_bnp.potential.MinibatchPotential.log_joint>` over the
unchanged Pyro model. Pyro's effect handlers run once, while tracing; only aten operations remain
in the graph, which ``torch.compile`` (inductor) then compiles. Dynamo never sees Pyro code.

The graph's inputs are the position, the cached gradient, the preconditioner's state, the noise
``xi``, the plate indices, the model's tensor arguments, the step-size coefficients and a small
float64 vector of counters; its outputs are the same quantities one update later:

* the noise and the mini-batch indices are drawn outside the graph, from the chain's own
  generator and in the eager kernel's order, so the compiled chain sees the eager chain's random
  stream (inductor's own generator is slower and reproduces nothing);
* a rejected update (a non-finite position, log density or gradient, or a parameter beyond
  ``max_abs_param``) is a ``torch.where`` back to the old state; the counters (rejections in a
  row, their maximum, whether the draw diverged, the first explosion and its value, the log
  density and gradient norm) stay on the device and are read once per draw, not once per update:
  ``max_rejections`` and ``max_abs_param`` are checked at the end of each draw, and after an
  explosion every further update of the draw is rejected, so the chain is left where the
  explosion began;
* the step size is a graph input, so schedules do not retrace.

Supported: the ``"identity"`` and ``"rmsprop"`` preconditioners (exactly those classes), models
that subsample only through the kernel's ``subsample_size``, any Pyro model whose log density
``make_fx`` can trace (no host reads such as ``float(tensor)`` or data-dependent Python branches).
Anything else runs the eager update, with a warning that says why.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from pyro_bnp.chain import ChainState
from pyro_bnp.potential import MinibatchPotential
from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop, standard_normal_like

__all__ = ["CompileUnsupported", "CompiledUpdate", "COMPILE_MODES"]

#: The values of the kernels' ``compile=`` argument.
COMPILE_MODES: tuple[Any, ...] = (False, True, "auto", "trace")

# positions in the float64 counter vector carried from update to update
_RIR, _MAXRIR, _DIV, _BOOM, _BOOM_VAL, _BOOM_AT, _COUNT, _LP, _GNORM = range(9)
_NUM_FLAGS = 9


class CompileUnsupported(RuntimeError):
    """The model, preconditioner or kernel options have no compiled update (the reason)."""


class _IdentityState:
    """Identity preconditioner in functional form: no state, ``A = I``."""

    size = 0

    def __init__(self, pre: Preconditioner, names: Sequence[str]) -> None:
        self.pre = pre

    def state(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        return []

    def update(
        self, state: list[Tensor], grads: list[Tensor], frozen: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        return [], []

    def apply(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        return list(values)

    def store(self, state: list[Tensor], aux: list[Tensor]) -> None:
        pass


class _RMSpropState:
    """RMSprop in functional form: state ``V`` per site, ``A = A^T = diag(sqrt(G))``."""

    def __init__(self, pre: Preconditioner, names: Sequence[str]) -> None:
        assert isinstance(pre, RMSprop)
        self.pre, self.names = pre, list(names)
        self.size = len(self.names)
        self.alpha, self.lam, self.inv_n = pre.alpha, pre.eps, 1.0 / pre.num_data

    def state(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        if not self.pre.v:  # V starts at the first per-datum squared gradient, as eagerly
            self.pre.update(grads)
        return [self.pre.v[n] for n in self.names]

    def update(
        self, state: list[Tensor], grads: list[Tensor], frozen: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        new, roots, diag = [], [], []
        for v, g in zip(state, grads, strict=True):
            gn = g * self.inv_n  # scaled before squaring, as the eager update
            v = torch.where(frozen, v, v * self.alpha + (1.0 - self.alpha) * (gn * gn))
            new.append(v)
            diag.append(1.0 / (torch.sqrt(v) + self.lam))
            roots.append(torch.sqrt(diag[-1]))
        return new, roots + diag  # aux: sqrt(G) per site, then G (for RMSprop.diagonal)

    def apply(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        return [x * r for x, r in zip(values, aux[: self.size], strict=True)]

    def store(self, state: list[Tensor], aux: list[Tensor]) -> None:
        pre, n = self.pre, self.size
        pre.v = dict(zip(self.names, state, strict=True))
        pre._root = dict(zip(self.names, aux[:n], strict=True))
        pre._g = dict(zip(self.names, aux[n:], strict=True))


_FUNCTIONAL: dict[type, type] = {Preconditioner: _IdentityState, Identity: _IdentityState}
_FUNCTIONAL[RMSprop] = _RMSpropState


@contextmanager
def _priors_unvalidated(priors: Sequence[Any]) -> Iterator[None]:
    """Switch argument validation off on distribution objects made before tracing."""
    old = [(p, p.__dict__.get("_validate_args")) for p in priors]
    try:
        for p, _ in old:
            p._validate_args = False
        yield
    finally:
        for p, value in old:
            if value is None:
                p.__dict__.pop("_validate_args", None)
            else:
                p._validate_args = value


class CompiledUpdate:
    """One chain's compiled update; :meth:`run` makes the updates of one draw.

    Parameters
    ----------
    kernel : pyro_bnp.kernel.SGMCMC
        A set-up kernel whose chain has started (first evaluation done).
    mode : bool or str
        ``True`` or ``"auto"``: ``make_fx`` then ``torch.compile``; ``"trace"``: the traced
        ``GraphModule`` run as it is (the eager kernel's aten operations, no inductor: for
        debugging and tests).
    options : Mapping, optional
        Inductor options (``torch._inductor.config``, e.g. ``{"max_autotune": True}``) and
        ``"checks"``: ``"host"`` (read the guards after every update: free on a CPU),
        ``"device"`` (select on the device, read once per draw: for GPUs) or ``"auto"`` (host on
        a CPU, device elsewhere).

    Raises
    ------
    CompileUnsupported
        If the preconditioner, the plates or the layer statistics have no compiled form, or
        tracing the model failed (the message says which and why).
    """

    def __init__(
        self, kernel: Any, mode: bool | str = True, options: Mapping[str, Any] | None = None
    ) -> None:
        pot: MinibatchPotential = kernel.potential
        chain: ChainState = kernel.chain
        pre: Preconditioner = kernel.preconditioner
        if type(pot) is not MinibatchPotential:
            raise CompileUnsupported(
                f"the kernel's potential is a {type(pot).__name__} (e.g. pyro_bnp.distributed's "
                "sharded one), which has no compiled form"
            )
        functional = _FUNCTIONAL.get(type(pre))
        if functional is None:
            raise CompileUnsupported(
                f"the preconditioner {pre.name!r} ({type(pre).__name__}) has no compiled form "
                "yet (compiled: 'identity' and 'rmsprop')"
            )
        if kernel.hooks is not None:
            raise CompileUnsupported("layer statistics (BNP's hooks) are not compiled yet")
        if pot.own_plates:
            raise CompileUnsupported(
                f"the model subsamples plates {sorted(pot.own_plates)} itself (a random draw "
                "inside the model); let the kernel subsample them with subsample_size"
            )
        self.kernel, self.mode = kernel, mode
        self.options = dict(options or {})
        checks = self.options.pop("checks", "auto")
        if checks not in ("auto", "host", "device"):
            raise ValueError(
                f"compile_options['checks'] must be 'auto', 'host' or 'device', got {checks!r}"
            )
        self.names = sorted(chain.z)
        self.plates = sorted(pot.plates)
        self.integrator: str = kernel._integrator()
        self.noise = kernel.temperature > 0.0
        self.functional = functional(pre, self.names)
        leaves, self._spec = tree_flatten((pot.args, pot.kwargs))
        self._tensor_pos = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
        self._leaves = leaves
        self.data = [leaves[i] for i in self._tensor_pos]
        z0 = chain.z[self.names[0]]
        self.device, self.dtype = z0.device, z0.dtype
        # On the CPU a host read costs about a microsecond and spares the two passes over the
        # parameters that selecting on the device takes; on a GPU it is a synchronisation.
        self.host_checks = checks == "host" or (checks == "auto" and z0.device.type == "cpu")
        # two constants: no allocation per update
        self._bool = {b: torch.tensor(b, device=self.device) for b in (False, True)}
        self._flags: Tensor | None = None
        self._last: tuple[float, float, int] | None = None
        self._coef_cache: tuple[float, Tensor] | None = None
        self.verified = False
        self.trace_seconds = math.nan
        self.compile_seconds = math.nan  # inductor's compilation of the traced graph
        self._fn: Callable[..., Any] | None = None
        self._graphs: dict[Any, Any] = {}
        self._key: tuple[Any, ...] = ()

    def key(self) -> tuple[Any, ...]:
        """Return what the graph depends on besides its inputs' values (retrace if it differs)."""
        kernel, pot, pre = self.kernel, self.kernel.potential, self.kernel.preconditioner
        chain = kernel.chain
        return (
            id(pot.model),
            self.integrator,
            type(pre),
            repr(pre.config()),
            pre.num_data,
            self.noise,
            self.mode,
            self.host_checks,
            repr(sorted(self.options.items())),
            kernel.max_abs_param,
            tuple((n, tuple(v.shape), v.dtype, v.device) for n, v in sorted(chain.z.items())),
            tuple(sorted(pot.plates.items())),
            tuple(sorted(pot.fast_sites)),
            tuple((tuple(v.shape), v.dtype, v.device) for v in self.data),
            repr(self._spec),
            tuple(repr(v) for v in self._leaves if not isinstance(v, Tensor)),
        )

    def attach(self, graphs: dict[Any, Any]) -> None:
        """Use (and fill) ``graphs``, a cache of traced updates by :meth:`key`."""
        self._graphs, self._key = graphs, self.key()
        self._fn = graphs.get(self._key)

    # ------------------------------------------------------------------ the graph
    def _body(self, *flat: Tensor) -> tuple[Tensor, ...]:
        """Make one update as a pure function of flat tensors (traced, never run eagerly)."""
        n, s = len(self.names), self.functional.size
        it = iter(flat)
        z = [next(it) for _ in range(n)]
        g = [next(it) for _ in range(n)]
        state = [next(it) for _ in range(s)]
        xi = [next(it) for _ in range(n)] if self.noise else []
        m = [next(it) for _ in range(n)] if self.integrator == "sghmc" else []
        idx = [next(it) for _ in self.plates]
        data = [next(it) for _ in self._tensor_pos]
        coef, frozen, first, flags = next(it), next(it), next(it), next(it)
        leaves = list(self._leaves)
        for i, v in zip(self._tensor_pos, data, strict=True):
            leaves[i] = v
        args, kwargs = tree_unflatten(leaves, self._spec)
        pot: MinibatchPotential = self.kernel.potential
        names, plates = self.names, self.plates

        def neg_log_joint(zs: list[Tensor]) -> tuple[Tensor, Tensor]:
            lp = pot.log_joint(
                dict(zip(names, zs, strict=True)),
                dict(zip(plates, idx, strict=True)),
                args,
                kwargs,
            )
            return -lp, lp

        state, aux = self.functional.update(state, g, frozen)
        c = coef.to(self.dtype)
        at_g = self.functional.apply(aux, g)
        # u = s xi - k A^T g (s: noise scale, k: drift coefficient)
        if xi:
            u = [x * c[0] - c[1] * a for x, a in zip(xi, at_g, strict=True)]
        else:  # no noise (T = 0)
            u = [-c[1] * a for a in at_g]
        if self.integrator == "sghmc":  # m' = decay m + u, theta' = theta + h A m'
            m_new = [mm * c[2] + uu for mm, uu in zip(m, u, strict=True)]
            step = [c[3] * w for w in self.functional.apply(aux, m_new)]
        else:  # theta' = theta + A u
            m_new = []
            step = self.functional.apply(aux, u)
        zn = [zz + w for zz, w in zip(z, step, strict=True)]
        grads, (_, lp) = torch.func.grad_and_value(neg_log_joint, has_aux=True)(zn)
        # one reduction per tensor: amax propagates NaN and inf, so is finite iff every entry is
        max_abs = torch.stack([v.abs().amax() for v in zn]).max()
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in grads]))
        if self.host_checks:  # the host selects: no pass over the parameters to select
            report = torch.stack([lp.double(), gnorm.double(), max_abs.double()])
            return (*zn, *grads, *state, *aux, *m_new, report)
        z_finite, g_finite = torch.isfinite(max_abs), torch.isfinite(gnorm)
        boom_before = flags[_BOOM] > 0
        too_big = z_finite & (max_abs > self.kernel.max_abs_param)
        boom = too_big & ~boom_before
        ok = z_finite & ~too_big & ~boom_before & torch.isfinite(lp) & g_finite
        z_out = [torch.where(ok, a, b) for a, b in zip(zn, z, strict=True)]
        g_out = [torch.where(ok, a, b) for a, b in zip(grads, g, strict=True)]
        m_out = [torch.where(ok, a, torch.zeros_like(a)) for a in m_new]
        # a new draw starts its maximum, divergence flag, explosion record and count afresh
        fresh = torch.stack(
            [flags[_RIR], flags[_RIR], *flags.new_tensor([0.0, 0.0, 0.0, -1.0, 0.0])]
        )
        f = torch.cat([torch.where(first, fresh, flags[:_LP]), flags[_LP:]])
        rir = torch.where(ok, torch.zeros_like(f[_RIR]), f[_RIR] + 1.0)
        new_flags = torch.stack(
            [
                rir,
                torch.maximum(f[_MAXRIR], rir),
                torch.where(ok, f[_DIV], torch.ones_like(f[_DIV])),
                torch.where(boom, torch.ones_like(f[_BOOM]), f[_BOOM]),
                torch.where(boom, max_abs.double(), f[_BOOM_VAL]),
                torch.where(boom, f[_COUNT], f[_BOOM_AT]),
                f[_COUNT] + 1.0,
                torch.where(ok, lp.double(), f[_LP]),
                torch.where(ok, gnorm.double(), f[_GNORM]),
            ]
        )
        return (*z_out, *g_out, *state, *aux, *m_out, new_flags)

    def _build(self, example: list[Any]) -> Callable[..., Any]:
        pot: MinibatchPotential = self.kernel.potential
        priors = [site.prior for site in pot._module_sites.values()]
        t0 = time.perf_counter()
        try:
            with pyro.validation_enabled(False), _priors_unvalidated(priors):
                gm = make_fx(self._body, tracing_mode="real")(*example)
        except Exception as exc:  # noqa: BLE001 (any tracing failure means: stay eager)
            raise CompileUnsupported(
                f"tracing the update with make_fx failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.trace_seconds = time.perf_counter() - t0
        if self.mode == "trace":
            return gm
        with warnings.catch_warnings():  # torch's own modules deprecate torch.jit on import
            warnings.simplefilter("ignore", DeprecationWarning)
            # inductor's advice to enable TF32 on GPUs: float32 matmul precision is the user's
            # choice (``torch.set_float32_matmul_precision``); the eager update uses the same
            warnings.filterwarnings("ignore", "TensorFloat32 tensor cores", UserWarning)
            import torch._inductor  # noqa: PLC0415 (seconds to import: only when compiling)

            t1 = time.perf_counter()
            out = torch._inductor.compile(gm, list(example), options=self.options or None)
        self.compile_seconds = time.perf_counter() - t1
        return out

    # ------------------------------------------------------------------ the loop
    def _coef(self, eps: float) -> Tensor:
        """``[s, k, decay, h]`` of the update at step size ``eps`` (float64, on the device)."""
        cached = self._coef_cache
        if cached is not None and cached[0] == eps:
            return cached[1]
        kernel, temp = self.kernel, self.kernel.temperature
        if self.integrator == "sghmc":
            var = eps * temp * (2.0 * kernel.friction - eps * temp * kernel.noise_estimate)
            values = [math.sqrt(max(var, 0.0)), eps, 1.0 - eps * kernel.friction, eps]
        else:
            values = [math.sqrt(eps * temp), 0.5 * eps, 1.0, 1.0]
        out = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._coef_cache = (eps, out)
        return out

    def run(self, chain: ChainState, num_updates: int) -> bool:
        """Make ``num_updates`` updates of ``chain`` (one draw); return whether one was rejected.

        Reads the device once at the end (the counters), then applies the guards.

        Raises
        ------
        RuntimeError
            The chain exploded past ``max_abs_param``, or ``max_rejections`` updates in a row
            were rejected (the same messages as the eager kernel's).
        CompileUnsupported
            At the first update, if tracing failed or the compiled log density and gradient
            disagree with the eager potential's (the chain is left at a valid, evaluated state).
        """
        kernel, pot, fn = self.kernel, self.kernel.potential, self.functional
        names = self.names
        if self._flags is None or self._last != (chain.lp, chain.gnorm, chain.rejected_in_row):
            # the chain changed outside this object (a start, a resume, an eager update)
            rir = chain.rejected_in_row
            self._flags = torch.tensor(
                [rir, rir, 0, 0, 0, -1, 0, chain.lp, chain.gnorm],
                dtype=torch.float64,
                device=self.device,
            )
        flags = self._flags
        t0 = chain.t
        undo = None
        if self._fn is None:  # a failed trace must leave the chain as it found it
            pre = kernel.preconditioner
            undo = (chain.rng.get_state(), dict(chain.perms), dict(chain.pos), pre.state_dict())
        state = fn.state(chain.grads)
        z = [chain.z[n] for n in names]
        g = [chain.grads[n] for n in names]
        frozen = self._bool[bool(kernel.preconditioner.frozen)]
        diverging = False
        for i in range(num_updates):
            eps = chain.eps = kernel._step_size_at(chain.t)
            m: list[Tensor] = []
            if self.integrator == "sghmc":
                kernel._check_step(eps, chain.t)
                mom = kernel._momentum(chain)
                m = [mom[n] for n in names]
            xi = standard_normal_like(chain.z, chain.rng) if self.noise else {}
            idx = pot.next_indices(chain.perms, chain.pos, chain.rng)
            inputs = [
                *z,
                *g,
                *state,
                *(xi[n] for n in names),
                *m,
                *(idx[p] for p in self.plates),
                *self.data,
                self._coef(eps),
                frozen,
                self._bool[i == 0],
                flags,
            ]
            if self._fn is None:
                try:
                    self._fn = self._graphs[self._key] = self._build(inputs)
                except CompileUnsupported:
                    assert undo is not None
                    chain.rng.set_state(undo[0])
                    chain.perms, chain.pos = undo[1], undo[2]
                    kernel.preconditioner.load_state_dict(undo[3])
                    raise
            out = self._fn(*inputs)
            k = len(names)
            z, g = list(out[:k]), list(out[k : 2 * k])
            rest = list(out[2 * k :])
            state, rest = rest[: fn.size], rest[fn.size :]
            aux, rest = rest[: len(rest) - 1 - len(m)], rest[len(rest) - 1 - len(m) :]
            chain.t += 1
            fn.store(state, aux)
            if self.host_checks:
                accepted = self._host_check(chain, z, g, rest, m)
                diverging = not accepted or diverging
                z, g = [chain.z[n] for n in names], [chain.grads[n] for n in names]
                if accepted and not self.verified:
                    self._verify(chain, idx, None)
                continue
            flags = rest[-1]
            chain.z = dict(zip(names, z, strict=True))
            chain.grads = dict(zip(names, g, strict=True))
            if m:
                chain.aux["momentum"] = dict(zip(names, rest[:-1], strict=True))
            if not self.verified:
                self._verify(chain, idx, flags)
        if self.host_checks:
            return diverging
        self._flags = flags
        return self._finish(chain, flags.tolist(), t0)

    def _host_check(
        self,
        chain: ChainState,
        z: list[Tensor],
        g: list[Tensor],
        rest: list[Tensor],
        m: list[Tensor],
    ) -> bool:
        """Apply the eager kernel's guards to one compiled update, read on the host (CPU)."""
        kernel = self.kernel
        lp, gnorm, max_abs = rest[-1].tolist()
        name = type(kernel).__name__
        if math.isfinite(max_abs) and max_abs > kernel.max_abs_param:
            raise RuntimeError(
                f"{name}: the chain is exploding: update {chain.t} moved a parameter to "
                f"|theta| = {max_abs:.3g} > max_abs_param={kernel.max_abs_param:g} (step size "
                f"{chain.eps:.3g}); try a smaller step size, e.g. "
                f"{kernel.suggest_step_size(chain.eps):.2g}"
            )
        names = self.names
        if math.isfinite(max_abs) and math.isfinite(lp) and math.isfinite(gnorm):
            chain.accept(
                dict(zip(names, z, strict=True)), lp, dict(zip(names, g, strict=True)), gnorm
            )
            if m:
                chain.aux["momentum"] = dict(zip(names, rest[:-1], strict=True))
            return True
        if m:
            chain.aux["momentum"] = {n: torch.zeros_like(v) for n, v in zip(names, m, strict=True)}
        chain.reject(kernel.max_rejections, name, kernel.suggest_step_size)
        return False

    def _verify(self, chain: ChainState, idx: Mapping[str, Tensor], flags: Tensor | None) -> None:
        """Compare the first accepted update's log density and gradient with the eager ones."""
        if flags is not None and flags[_DIV] > 0:  # rejected: nothing to compare; try the next
            return
        pot = self.kernel.potential
        with pyro.validation_enabled(False):
            lp, grads = pot(chain.z, idx)
        lp_c = chain.lp if flags is None else float(flags[_LP])
        # float32: eager itself is 1e-4 to 5e-4 (per site, relative) from the float64 gradient
        # on ResNet-20 and inductor's fused kernels about 1e-3 (measured; docs/usage.md), so the
        # gradient is checked to 1e-2 there: a wrong graph (a lost term, data baked in) is
        # off by far more. The log density is a sum and keeps 1e-4.
        tol, gtol = (1e-4, 1e-2) if self.dtype == torch.float32 else (1e-9, 1e-9)
        worst = 0.0
        for n, v in grads.items():
            scale = float(torch.linalg.vector_norm(v)) + 1e-30
            worst = max(worst, float(torch.linalg.vector_norm(chain.grads[n] - v)) / scale)
        lp_err = abs(lp_c - lp) / (1.0 + abs(lp))
        # the eager values: the chain stays valid either way
        chain.lp, chain.grads = lp, grads
        if flags is not None:
            flags[_LP] = lp
        if not (lp_err <= tol and worst <= gtol):
            raise CompileUnsupported(
                "the compiled log density or gradient disagrees with the eager potential's "
                f"(relative errors: lp {lp_err:.3g}, gradient {worst:.3g}; tolerances {tol:g}, "
                f"{gtol:g})"
            )
        self.verified = True

    def _finish(self, chain: ChainState, rep: list[float], t0: int) -> bool:
        kernel = self.kernel
        chain.lp, chain.gnorm = rep[_LP], rep[_GNORM]
        chain.rejected_in_row = int(rep[_RIR])
        self._last = (chain.lp, chain.gnorm, chain.rejected_in_row)
        if rep[_BOOM] > 0:
            update = t0 + int(rep[_BOOM_AT]) + 1
            raise RuntimeError(
                f"{type(kernel).__name__}: the chain is exploding: update {update} moved a "
                f"parameter to |theta| = {rep[_BOOM_VAL]:.3g} > "
                f"max_abs_param={kernel.max_abs_param:g} (step size {chain.eps:.3g}); try a "
                f"smaller step size, e.g. {kernel.suggest_step_size(chain.eps):.2g}"
            )
        if rep[_MAXRIR] >= kernel.max_rejections:
            chain.rejected_in_row = kernel.max_rejections - 1
            chain.reject(kernel.max_rejections, type(kernel).__name__, kernel.suggest_step_size)
        return rep[_DIV] > 0


def compile_warning(reason: str) -> str:
    """Return the one-time warning shown when ``compile=`` falls back to the eager update."""
    return f"compile: using the eager update instead of the compiled one: {reason}"


def warn_once(kernel: Any, reason: str) -> None:
    """Warn ``compile_warning(reason)`` once per kernel."""
    key = "compile:" + reason
    if key not in kernel._warned:
        kernel._warned.add(key)
        warnings.warn(compile_warning(reason), RuntimeWarning, stacklevel=4)

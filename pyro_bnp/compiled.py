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

Supported: the ``"identity"``, ``"rmsprop"``, ``"bnp"``, ``"bnp+rmsprop"`` and ``"bnp-others"``
preconditioners and ``BNP(prior_cap=...)`` (exactly those classes; BNP's layer statistics are
graph state, see :class:`_BNPState`), models that subsample only through the kernel's
``subsample_size``, any Pyro model whose log density ``make_fx`` can trace (no host reads such as
``float(tensor)`` or data-dependent Python branches). Anything else runs the eager update, with a
warning that says why.
"""

from __future__ import annotations

import dataclasses
import functools
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

from pyro_bnp.bnp import BNP, balance_factor
from pyro_bnp.chain import ChainState
from pyro_bnp.layers import RunningInputStats
from pyro_bnp.potential import MinibatchPotential
from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop, standard_normal_like

__all__ = ["CompileUnsupported", "CompiledUpdate", "COMPILE_MODES"]

#: The values of the kernels' ``compile=`` argument.
COMPILE_MODES: tuple[Any, ...] = (False, True, "auto", "trace")

# positions in the float64 counter vector carried from update to update
_RIR, _MAXRIR, _DIV, _BOOM, _BOOM_VAL, _BOOM_AT, _COUNT, _ACC, _LP, _GNORM = range(10)


class CompileUnsupported(RuntimeError):
    """The model, preconditioner or kernel options have no compiled update (the reason)."""


class _IdentityState:
    """A preconditioner in functional form; this one is the identity (no state, ``A = I``).

    The protocol: :attr:`size` tensors of state changed before the move (RMSprop's ``V``),
    :attr:`stats_size` tensors of layer statistics changed by the forward pass at the proposal
    (BNP's, undone when it is rejected), read by :meth:`state` and :meth:`stats`;
    :meth:`update` returns the new state and ``aux`` (what the maps need); :meth:`apply` is
    ``A``, :meth:`apply_t` is ``A^T``; :meth:`observe` folds the layer inputs of the forward
    pass into the statistics (inside the traced gradient; :attr:`modules` are the layers whose
    inputs it needs); :meth:`export` picks the part of ``aux`` returned from the graph;
    :meth:`store`, :meth:`set_stats`, :meth:`set_step` and :meth:`count_batches` write the
    results back into the preconditioner object; :meth:`key` is what the graph depends on.
    """

    size = 0
    stats_size = 0
    modules: Sequence[Any] = ()

    def __init__(self, pre: Preconditioner, names: Sequence[str], kernel: Any) -> None:
        self.pre = pre

    def key(self) -> tuple[Any, ...]:
        return ()

    def state(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        return []

    def stats(self) -> list[Tensor]:
        return []

    def update(
        self,
        state: list[Tensor],
        stats: list[Tensor],
        grads: list[Tensor],
        frozen: Tensor,
        step: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        return [], []

    def apply(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        return list(values)

    def apply_t(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        return self.apply(aux, values)

    def export(self, aux: list[Tensor]) -> list[Tensor]:
        """Return the part of ``aux`` that :meth:`store` needs (graph outputs cost memory)."""
        return aux

    def observe(
        self, stats: list[Tensor], inputs: list[list[Tensor]], frozen: Tensor
    ) -> list[Tensor]:
        return []

    def store(self, state: list[Tensor], stats: list[Tensor], aux: list[Tensor]) -> None:
        pass

    def set_stats(self, stats: list[Tensor]) -> None:
        pass

    def set_step(self, step_size: float) -> None:
        pass

    def count_batches(self, accepted: int) -> None:
        pass


class _RMSpropState(_IdentityState):
    """RMSprop in functional form: state ``V`` per site, ``A = A^T = diag(sqrt(G))``."""

    pre: RMSprop

    def __init__(self, pre: Preconditioner, names: Sequence[str], kernel: Any = None) -> None:
        assert isinstance(pre, RMSprop)
        self.pre, self.names = pre, list(names)
        self.size = len(self.names)
        self.alpha, self.lam, self.inv_n = pre.alpha, pre.eps, 1.0 / pre.num_data

    def state(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        if not self.pre.v:  # V starts at the first per-datum squared gradient, as eagerly
            self.pre.update(grads)
        return [self.pre.v[n] for n in self.names]

    def update(
        self,
        state: list[Tensor],
        stats: list[Tensor],
        grads: list[Tensor],
        frozen: Tensor,
        step: Tensor | None = None,
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

    def store(self, state: list[Tensor], stats: list[Tensor], aux: list[Tensor]) -> None:
        pre, n = self.pre, self.size
        pre.v = dict(zip(self.names, state, strict=True))
        pre._root = dict(zip(self.names, aux[:n], strict=True))
        pre._g = dict(zip(self.names, aux[n:], strict=True))


class _BNPState(_IdentityState):
    """BNP (plain or with RMSprop in BNP coordinates) in functional form.

    The layer statistics (running mean and variance of each layer's input) are graph state:
    the graph derives ``s^2 = var + eps1 max(var) + eps2``, ``r = 1 / s`` and ``c = mu r`` from
    them (as :meth:`BNP._refresh <pyro_bnp.bnp.BNP>` does, with ``max(var)`` a tensor instead
    of a host float), maps with :meth:`BNP._to_z` (``A^T``) and :meth:`BNP._from_z` (``A``),
    and folds the inputs that the forward pass at the proposal gives each layer
    (:meth:`RunningInputStats.fold <pyro_bnp.layers.RunningInputStats.fold>`, the eager
    formula) into new statistics: kept when the update is accepted, the preconditioner is not
    frozen and the new variance is finite (the eager rules). ``q`` is a constant of the graph
    (the mini-batch and feature-map sizes are).
    """

    pre: BNP

    def __init__(self, pre: Preconditioner, names: Sequence[str], kernel: Any) -> None:
        assert isinstance(pre, BNP)
        self.pre, self.names = pre, list(names)
        hooks = kernel.hooks
        module_of = {} if hooks is None else {id(st): m for m, st in hooks.pairs}
        self.blocks = list(pre._blocks.values())
        self.modules = []
        self.running: list[RunningInputStats] = []
        for block in self.blocks:
            stats = block.ref.stats
            if not isinstance(stats, RunningInputStats) or id(stats) not in module_of:
                raise CompileUnsupported(
                    f"BNP layer {block.ref.name!r}: its statistics are not a hooked "
                    "RunningInputStats (pyro_bnp.layers.find_layers makes those)"
                )
            if stats.num_batches == 0 and stats.init == "batch":
                raise CompileUnsupported(f"BNP layer {block.ref.name!r} has seen no batch yet")
            self.modules.append(module_of[id(stats)])
            self.running.append(stats)
        rms = pre.rmsprop
        self.rms = None if rms is None else _RMSpropState(rms, names)
        # BNP(others=RMSprop(...)): RMSprop on the sites outside the layers, in theta
        self.other_pos = [i for i, n in enumerate(names) if n in set(pre._other_names)]
        self.others = None
        if pre.others is not None:
            self.others = _RMSpropState(pre.others, [names[i] for i in self.other_pos])
        inner = self.rms or self.others
        self.size = 0 if inner is None else inner.size
        self.stats_size = 2 * len(self.blocks)
        self.n_aux = 3 * len(self.blocks)  # r, c and 1/q per layer, then the inner RMSprop's
        self.q2 = [
            balance_factor(b.fan_in, b.ref.stats.batch_size, b.ref.stats.spatial_size)
            for b in self.blocks
        ]

    def key(self) -> tuple[Any, ...]:
        layers = tuple(
            (b.ref.name, st.batch_size, st.spatial_size)
            for b, st in zip(self.blocks, self.running, strict=True)
        )
        return layers, repr(sorted(self.pre._priors.items()))

    def set_step(self, step_size: float) -> None:
        self.pre._set_cap_step_size(step_size)  # (prior_cap: the blocks follow the step size)

    def state(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        if self.others is not None:
            return self.others.state({n: grads[n] for n in self.others.names})
        if self.rms is None:
            return []
        if not self.rms.pre.v:  # V starts at the first g_z, as eagerly
            self.pre.update(grads)
        return self.rms.state(grads)

    def stats(self) -> list[Tensor]:
        out = []
        for b in self.blocks:
            st = b.ref.stats
            for t in (st.mean, st.var):
                out.append(
                    t if t.dtype == b.dtype and t.device == b.device else t.to(b.device, b.dtype)
                )
        return out

    def _blocks_with(self, aux: list[Tensor]) -> list[Any]:
        """Return copies of the blocks with the graph's ``r``, ``c`` and ``1/q`` (no leaks)."""
        out = []
        for i, b in enumerate(self.blocks):
            r, c = aux[3 * i], aux[3 * i + 1]
            iq: Any = aux[3 * i + 2]  # a float, or a 0-d tensor under prior_cap
            out.append(dataclasses.replace(b, r=r, c=c, a=None, ca=None, iq=iq))
        return out

    def update(
        self,
        state: list[Tensor],
        stats: list[Tensor],
        grads: list[Tensor],
        frozen: Tensor,
        step: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        pre, aux = self.pre, []
        for i, (b, q2) in enumerate(zip(self.blocks, self.q2, strict=True)):
            mu, var = stats[2 * i], stats[2 * i + 1]
            s2 = var + (var.amax() * pre.eps1 + pre.eps2)
            iq: Any = 1.0 / math.sqrt(q2)
            prior = pre._priors.get(b.ref.name)
            if pre.prior_cap is not None and prior is not None and step is not None:
                # the eager cap (BNP._capped, tensor arithmetic): q depends on the statistics
                s2, q2_t = BNP._capped(b, mu, s2, q2, prior, step, pre.prior_cap)
                iq = q2_t.rsqrt().to(s2.dtype)
            r = s2.rsqrt()
            c = mu * r
            if not b.dense:
                g, _, cin_g, _ = b.shape4
                r, c = r.view(g, 1, cin_g, 1), c.view(g, 1, cin_g, 1)
            aux += [r, c, iq]
        if self.others is not None:
            other_g = [grads[i] for i in self.other_pos]
            state, o_aux = self.others.update(state, [], other_g, frozen)
            return state, aux + o_aux
        if self.rms is None:
            return [], aux
        gz = self._map(aux, grads, to_z=True)
        state, rms_aux = self.rms.update(state, [], gz, frozen)
        return state, aux + rms_aux

    def _others(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        """``sqrt(G)`` of ``others``' RMSprop on the sites outside the layers."""
        if self.others is None or not self.other_pos:
            return values
        out = list(values)
        scaled = self.others.apply(aux[self.n_aux :], [values[i] for i in self.other_pos])
        for i, v in zip(self.other_pos, scaled, strict=True):
            out[i] = v
        return out

    @staticmethod
    def _dense(b: Any, w: Tensor, bias: Tensor | None, to_z: bool) -> tuple[Tensor, Any]:
        """:meth:`BNP._to_z` / :meth:`BNP._from_z` of a dense layer, by broadcasting.

        The same equations without ``addr`` / ``addmv``, which a compiler leaves as library
        calls: this way they fuse with the rest of the update.
        """
        a, ca = BNP._scaled(b)
        if bias is None:
            return w * a, None
        if to_z:  # z_w = (g_w - g_b mu) / (q s), z_b = g_b / q
            return w * a - bias.unsqueeze(1) * ca, bias * b.iq
        return w * a, bias * b.iq - (w * ca).sum(1)  # w = z_w / (q s), b = z_b / q - ...

    def _map(self, aux: list[Tensor], values: list[Tensor], to_z: bool) -> list[Tensor]:
        out = dict(zip(self.names, values, strict=True))
        conv = BNP._to_z if to_z else BNP._from_z
        for b in self._blocks_with(aux):
            w, bname = b.ref.weight, b.ref.bias
            bias = None if bname is None else out[bname]
            nw, nb = self._dense(b, out[w], bias, to_z) if b.dense else conv(b, out[w], bias)
            out[w] = nw
            if bname is not None and nb is not None:
                out[bname] = nb
        return [out[n] for n in self.names]

    def apply_t(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        gz = self._others(aux, self._map(aux, values, to_z=True))
        if self.rms is None:
            return gz
        return self.rms.apply(aux[self.n_aux :], gz)

    def apply(self, aux: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        if self.rms is not None:
            values = self.rms.apply(aux[self.n_aux :], values)
        return self._others(aux, self._map(aux, values, to_z=False))

    def observe(
        self, stats: list[Tensor], inputs: list[list[Tensor]], frozen: Tensor
    ) -> list[Tensor]:
        out = []
        for i, (b, st, seen) in enumerate(zip(self.blocks, self.running, inputs, strict=True)):
            mean, var = stats[2 * i], stats[2 * i + 1]
            for h in seen:
                x, n, spatial = st._batch(h.detach())
                if (n, spatial) != (st.batch_size, st.spatial_size):
                    raise CompileUnsupported(
                        f"BNP layer {b.ref.name!r} saw a batch of {n} x {spatial} while "
                        f"tracing, {st.batch_size} x {st.spatial_size} before"
                    )
                new_mean, new_var, _, _ = st.fold(mean, var, x, True)
                keep = ~frozen & torch.isfinite(new_var.amax())
                mean = torch.where(keep, new_mean, mean)
                var = torch.where(keep, new_var, var)
            out += [mean, var]
        return out

    def set_stats(self, stats: list[Tensor]) -> None:
        """Put ``stats`` into the layers' statistics."""
        for i, b in enumerate(self.blocks):
            st = b.ref.stats
            st.mean, st.var = stats[2 * i], stats[2 * i + 1]
            b.fresh = False  # BNP derives r and c from the statistics when it is asked again

    def export(self, aux: list[Tensor]) -> list[Tensor]:
        return aux[self.n_aux :]  # RMSprop's (r, c and q are derived again when needed)

    def store(self, state: list[Tensor], stats: list[Tensor], aux: list[Tensor]) -> None:
        self.set_stats(stats)
        inner = self.rms or self.others
        if inner is not None:
            inner.store(state, [], aux)

    def count_batches(self, accepted: int) -> None:
        for st in self.running:
            if not st.frozen:
                st.num_batches += accepted


_FUNCTIONAL: dict[type, type] = {Preconditioner: _IdentityState, Identity: _IdentityState}
_FUNCTIONAL[RMSprop] = _RMSpropState
_FUNCTIONAL[BNP] = _BNPState


class _Capture:
    """Forward pre-hook used while tracing: keeps the layer's input (a traced tensor)."""

    def __init__(self, seen: list[Tensor]) -> None:
        self.seen = seen

    def __call__(self, module: Any, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            self.seen.append(args[0])


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
                "yet (compiled: 'identity', 'rmsprop', 'bnp', 'bnp+rmsprop' and 'bnp-others')"
            )
        if kernel.hooks is not None and functional is not _BNPState:
            raise CompileUnsupported("layer statistics of a preconditioner other than BNP")
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
        unroll = self.options.pop("unroll", 1)
        if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
            raise ValueError(f"compile_options['unroll'] must be a positive int, got {unroll!r}")
        if unroll > 1 and checks == "host":
            raise ValueError(
                "compile_options: unroll > 1 needs checks='device' (the guards of the updates "
                "inside one call are applied on the device), got checks='host'"
            )
        self.unroll = unroll
        self.names = sorted(chain.z)
        self.plates = sorted(pot.plates)
        self.integrator: str = kernel._integrator()
        self.noise = kernel.temperature > 0.0
        self.functional = functional(pre, self.names, kernel)
        leaves, self._spec = tree_flatten((pot.args, pot.kwargs))
        self._tensor_pos = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
        self._leaves = leaves
        self.data = [leaves[i] for i in self._tensor_pos]
        z0 = chain.z[self.names[0]]
        self.device, self.dtype = z0.device, z0.dtype
        # On the CPU a host read costs about a microsecond and spares the two passes over the
        # parameters that selecting on the device takes; on a GPU it is a synchronisation.
        self.host_checks = checks == "host" or (
            checks == "auto" and z0.device.type == "cpu" and unroll == 1
        )
        # two constants: no allocation per update
        self._bool = {b: torch.tensor(b, device=self.device) for b in (False, True)}
        self._flags: Tensor | None = None
        self._last: tuple[float, float, int] | None = None
        self._coef_cache: tuple[float, Tensor] | None = None
        self.verified = False
        self.trace_seconds = math.nan
        self.compile_seconds = math.nan  # inductor's compilation of the traced graph
        self._fns: dict[int, Callable[..., Any]] = {}  # by updates per call
        self._graphs: dict[Any, Any] = {}
        self._key: tuple[Any, ...] = ()
        # per BNP layer: its inputs in one forward pass, filled by hooks while tracing only
        self._inputs: list[list[Tensor]] = [[] for _ in self.functional.modules]
        # the preconditioner's state after the last update of a draw (stored once per draw)
        self._out_state: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._accepted = 0  # accepted updates of the draw (host checks; BNP counts batches)

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
            self.functional.key(),
            tuple((n, tuple(v.shape), v.dtype, v.device) for n, v in sorted(chain.z.items())),
            tuple(sorted(pot.plates.items())),
            tuple(sorted(pot.fast_sites)),
            tuple((tuple(v.shape), v.dtype, v.device) for v in self.data),
            repr(self._spec),
            tuple(repr(v) for v in self._leaves if not isinstance(v, Tensor)),
        )

    def attach(self, graphs: dict[Any, Any]) -> None:
        """Use (and fill) ``graphs``, a cache of traced updates by :meth:`key` and length."""
        self._graphs, self._key = graphs, self.key()
        self._fns = {
            k: graphs[(self._key, k)] for k in {1, self.unroll} if (self._key, k) in graphs
        }

    # ------------------------------------------------------------------ the graph
    def _body(self, k: int, *flat: Tensor) -> tuple[Tensor, ...]:
        """Make ``k`` updates as a pure function of flat tensors (traced, never run eagerly).

        Inputs: z, g, state, stats, then per update its noise, the momentum (SGHMC), per update
        its plate indices, the data, per update its coefficients, frozen, first, flags.
        """
        fn = self.functional
        n, s = len(self.names), fn.size
        it = iter(flat)
        z = [next(it) for _ in range(n)]
        g = [next(it) for _ in range(n)]
        state = [next(it) for _ in range(s)]
        stats = [next(it) for _ in range(fn.stats_size)]
        xis = [[next(it) for _ in range(n)] if self.noise else [] for _ in range(k)]
        m = [next(it) for _ in range(n)] if self.integrator == "sghmc" else []
        idxs = [[next(it) for _ in self.plates] for _ in range(k)]
        data = [next(it) for _ in self._tensor_pos]
        coefs = [next(it) for _ in range(k)]
        frozen, first, flags = next(it), next(it), next(it)
        leaves = list(self._leaves)
        for i, v in zip(self._tensor_pos, data, strict=True):
            leaves[i] = v
        args, kwargs = tree_unflatten(leaves, self._spec)
        if self.host_checks:  # one update; the host selects: no pass over the parameters
            assert k == 1
            zn, grads, state, new_stats, aux, m_new, lp, gnorm, max_abs = self._one(
                z, g, state, stats, xis[0], m, idxs[0], args, kwargs, coefs[0], frozen
            )
            report = torch.stack([lp.double(), gnorm.double(), max_abs.double()])
            return (*zn, *grads, *state, *new_stats, *fn.export(aux), *m_new, report)
        out_aux: list[Tensor] = []
        for j in range(k):  # later updates of the chunk are never a draw's first
            z, g, state, stats, out_aux, m, flags = self._select(
                z, g, stats, m, flags, first if j == 0 else self._false_in_graph(first),
                *self._one(z, g, state, stats, xis[j], m, idxs[j], args, kwargs, coefs[j], frozen),
            )  # fmt: skip
        return (*z, *g, *state, *stats, *fn.export(out_aux), *m, flags)

    @staticmethod
    def _false_in_graph(like: Tensor) -> Tensor:
        return torch.zeros_like(like)

    def _one(
        self,
        z: list[Tensor],
        g: list[Tensor],
        state: list[Tensor],
        stats: list[Tensor],
        xi: list[Tensor],
        m: list[Tensor],
        idx: list[Tensor],
        args: Any,
        kwargs: Any,
        coef: Tensor,
        frozen: Tensor,
    ) -> tuple[Any, ...]:
        """One update, unselected: the proposal, its gradient, state, statistics and checks."""
        fn = self.functional
        pot: MinibatchPotential = self.kernel.potential
        names, plates = self.names, self.plates

        def neg_log_joint(zs: list[Tensor]) -> tuple[Tensor, tuple[Tensor, list[Tensor]]]:
            for seen in self._inputs:
                seen.clear()
            lp = pot.log_joint(
                dict(zip(names, zs, strict=True)),
                dict(zip(plates, idx, strict=True)),
                args,
                kwargs,
            )
            # the layer inputs of this forward pass (trace-time hooks), folded in the graph
            return -lp, (lp, fn.observe(stats, self._inputs, frozen))

        state, aux = fn.update(state, stats, g, frozen, coef[4])
        c = coef.to(self.dtype)
        at_g = fn.apply_t(aux, g)
        # u = s xi - k A^T g (s: noise scale, k: drift coefficient)
        if xi:
            u = [x * c[0] - c[1] * a for x, a in zip(xi, at_g, strict=True)]
        else:  # no noise (T = 0)
            u = [-c[1] * a for a in at_g]
        if self.integrator == "sghmc":  # m' = decay m + u, theta' = theta + h A m'
            m_new = [mm * c[2] + uu for mm, uu in zip(m, u, strict=True)]
            step = [c[3] * w for w in fn.apply(aux, m_new)]
        else:  # theta' = theta + A u
            m_new = []
            step = fn.apply(aux, u)
        zn = [zz + w for zz, w in zip(z, step, strict=True)]
        grads, (_, (lp, new_stats)) = torch.func.grad_and_value(neg_log_joint, has_aux=True)(zn)
        # one reduction per tensor: amax propagates NaN and inf, so is finite iff every entry is
        max_abs = torch.stack([v.abs().amax() for v in zn]).max()
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in grads]))
        return zn, grads, state, new_stats, aux, m_new, lp, gnorm, max_abs

    def _select(
        self,
        z: list[Tensor],
        g: list[Tensor],
        stats: list[Tensor],
        m: list[Tensor],
        flags: Tensor,
        first: Tensor,
        zn: list[Tensor],
        grads: list[Tensor],
        state: list[Tensor],
        new_stats: list[Tensor],
        aux: list[Tensor],
        m_new: list[Tensor],
        lp: Tensor,
        gnorm: Tensor,
        max_abs: Tensor,
    ) -> tuple[Any, ...]:
        """Apply the guards on the device: keep the proposal or the old state; count."""
        z_finite, g_finite = torch.isfinite(max_abs), torch.isfinite(gnorm)
        boom_before = flags[_BOOM] > 0
        too_big = z_finite & (max_abs > self.kernel.max_abs_param)
        boom = too_big & ~boom_before
        ok = z_finite & ~too_big & ~boom_before & torch.isfinite(lp) & g_finite
        z_out = [torch.where(ok, a, b) for a, b in zip(zn, z, strict=True)]
        g_out = [torch.where(ok, a, b) for a, b in zip(grads, g, strict=True)]
        m_out = [torch.where(ok, a, torch.zeros_like(a)) for a in m_new]
        stats_out = [torch.where(ok, a, b) for a, b in zip(new_stats, stats, strict=True)]
        # a new draw starts its maximum, divergence flag, explosion record and counts afresh
        fresh = torch.stack(
            [flags[_RIR], flags[_RIR], *flags.new_tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0])]
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
                f[_ACC] + ok.double(),
                torch.where(ok, lp.double(), f[_LP]),
                torch.where(ok, gnorm.double(), f[_GNORM]),
            ]
        )
        return z_out, g_out, state, stats_out, aux, m_out, new_flags

    def _build(self, k: int, example: list[Any]) -> Callable[..., Any]:
        pot: MinibatchPotential = self.kernel.potential
        priors = [site.prior for site in pot._module_sites.values()]
        t0 = time.perf_counter()
        handles = [
            module.register_forward_pre_hook(_Capture(seen))
            for module, seen in zip(self.functional.modules, self._inputs, strict=True)
        ]
        try:
            with pyro.validation_enabled(False), _priors_unvalidated(priors):
                gm = make_fx(functools.partial(self._body, k), tracing_mode="real")(*example)
        except CompileUnsupported:
            raise
        except Exception as exc:  # noqa: BLE001 (any tracing failure means: stay eager)
            raise CompileUnsupported(
                f"tracing the update with make_fx failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
            for seen in self._inputs:
                seen.clear()
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
            try:
                out = torch._inductor.compile(gm, list(example), options=self.options or None)
            except Exception as exc:  # noqa: BLE001 (an inductor failure means: stay eager)
                raise CompileUnsupported(
                    f"inductor failed to compile the traced update: {type(exc).__name__}: "
                    f"{str(exc)[:500]}"
                ) from exc
        self.compile_seconds = time.perf_counter() - t1
        return out

    # ------------------------------------------------------------------ the loop
    def _coef(self, eps: float) -> Tensor:
        """``[s, k, decay, h, cap]`` of the update at step size ``eps`` (float64, on the device).

        ``cap``: the SGLD step size of equal stability, for ``BNP(prior_cap=...)``.
        """
        cached = self._coef_cache
        if cached is not None and cached[0] == eps:
            return cached[1]
        kernel, temp = self.kernel, self.kernel.temperature
        if self.integrator == "sghmc":
            var = eps * temp * (2.0 * kernel.friction - eps * temp * kernel.noise_estimate)
            values = [math.sqrt(max(var, 0.0)), eps, 1.0 - eps * kernel.friction, eps]
        else:
            values = [math.sqrt(eps * temp), 0.5 * eps, 1.0, 1.0]
        values.append(kernel._sgld_equivalent(eps))
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
        kernel, fn, names = self.kernel, self.functional, self.names
        if self._flags is None or (
            not self.host_checks and self._last != (chain.lp, chain.gnorm, chain.rejected_in_row)
        ):  # the chain changed outside this object (a start, a resume, an eager update); with
            # host checks the graph ignores the counters (the host keeps them): made once
            rir = chain.rejected_in_row
            self._flags = torch.tensor(
                [rir, rir, 0, 0, 0, -1, 0, 0, chain.lp, chain.gnorm],
                dtype=torch.float64,
                device=self.device,
            )
        flags = self._flags
        t0 = chain.t
        state = fn.state(chain.grads)
        stats = fn.stats()
        z = [chain.z[n] for n in names]
        g = [chain.grads[n] for n in names]
        frozen = self._bool[bool(kernel.preconditioner.frozen)]
        try:
            diverging = self._loop(chain, num_updates, state, stats, z, g, frozen, flags)
        finally:  # the preconditioner's state as of the last update made, once per draw
            fn.set_step(kernel._sgld_equivalent(chain.eps))
            if self._out_state is not None:
                fn.store(*self._out_state)
                self._out_state = None
            fn.count_batches(self._accepted)
            self._accepted = 0
        if self.host_checks:
            return diverging
        return self._finish(chain, self._flags.tolist(), t0)

    def _loop(
        self,
        chain: ChainState,
        num_updates: int,
        state: list[Tensor],
        stats: list[Tensor],
        z: list[Tensor],
        g: list[Tensor],
        frozen: Tensor,
        flags: Tensor,
    ) -> bool:
        """Make the updates of :meth:`run`, in calls of ``unroll`` updates (or one).

        The last state goes to ``_out_state``, the counters to ``_flags`` (device checks) or
        ``_accepted`` (host checks). The first update of a chain is always a call of one, so
        that it can be checked against the eager potential.
        """
        kernel, pot, fn, names = self.kernel, self.kernel.potential, self.functional, self.names
        diverging = False
        done = 0
        m: list[Tensor] = []
        while done < num_updates:
            k = self.unroll if self.verified and num_updates - done >= self.unroll else 1
            every = getattr(kernel, "resample_momentum", None)  # SGHMC: a fresh momentum at t
            if k > 1 and every is not None and any((chain.t + j) % every == 0 for j in range(1, k)):
                k = 1  # only at the start of a call (the eager order of the random draws)
            graph = self._fns.get(k)
            undo = None
            if graph is None:  # a failed trace must leave the chain as it found it
                if self._out_state is not None:
                    fn.store(*self._out_state)
                pre = kernel.preconditioner
                undo = (chain.rng.get_state(), dict(chain.perms), dict(chain.pos),
                        pre.state_dict())  # fmt: skip
            if self.integrator == "sghmc":
                mom = kernel._momentum(chain)
                m = [mom[n] for n in names]
            xis, idxs, coefs = [], [], []
            for j in range(k):
                eps = chain.eps = kernel._step_size_at(chain.t + j)
                if self.integrator == "sghmc":
                    kernel._check_step(eps, chain.t + j)
                if self.noise:
                    xi = standard_normal_like(chain.z, chain.rng)
                    xis += [xi[n] for n in names]
                idx = pot.next_indices(chain.perms, chain.pos, chain.rng)
                idxs += [idx[p] for p in self.plates]
                coefs.append(self._coef(eps))
            inputs = [*z, *g, *state, *stats, *xis, *m, *idxs, *self.data, *coefs, frozen,
                      self._bool[done == 0], flags]  # fmt: skip
            if graph is None:
                try:
                    graph = self._build(k, inputs)
                except CompileUnsupported:
                    assert undo is not None
                    chain.rng.set_state(undo[0])
                    chain.perms, chain.pos = undo[1], undo[2]
                    kernel.preconditioner.load_state_dict(undo[3])
                    raise
                self._fns[k] = self._graphs[(self._key, k)] = graph
            out = graph(*inputs)
            n = len(names)
            z, g = list(out[:n]), list(out[n : 2 * n])
            rest = list(out[2 * n :])
            state, rest = rest[: fn.size], rest[fn.size :]
            new_stats, rest = rest[: fn.stats_size], rest[fn.stats_size :]
            aux, rest = rest[: len(rest) - 1 - len(m)], rest[len(rest) - 1 - len(m) :]
            chain.t += k
            done += k
            old_stats = stats
            if self.host_checks:
                self._out_state = (state, stats, aux)  # V changes even when rejected
                accepted = self._host_check(chain, z, g, rest, m)
                diverging = not accepted or diverging
                if not accepted:
                    z, g = [chain.z[n] for n in names], [chain.grads[n] for n in names]
                    continue
                stats = new_stats
                self._out_state = (state, stats, aux)
                self._accepted += 1
                if not self.verified:
                    fn.store(state, stats, aux)
                    self._verify(chain, idx, None, old_stats)
                continue
            stats = new_stats
            self._out_state = (state, stats, aux)
            self._flags = flags = rest[-1]
            chain.z = dict(zip(names, z, strict=True))
            chain.grads = dict(zip(names, g, strict=True))
            if m:
                chain.aux["momentum"] = dict(zip(names, rest[:-1], strict=True))
            if not self.verified:
                fn.store(state, stats, aux)
                self._verify(chain, idx, flags, old_stats)
        return diverging

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

    def _verify(
        self,
        chain: ChainState,
        idx: Mapping[str, Tensor],
        flags: Tensor | None,
        stats_before: list[Tensor],
    ) -> None:
        """Compare the first accepted update with the eager potential and layer hooks.

        The log density, the gradient and, with BNP, the layer statistics (the eager hooks fold
        the same batch into the statistics from before the update).
        """
        if flags is not None and flags[_DIV] > 0:  # rejected: nothing to compare; try the next
            return
        kernel, pot, fn = self.kernel, self.kernel.potential, self.functional
        stats_after = fn.stats()
        hooks = kernel.hooks if fn.stats_size and not kernel.preconditioner.frozen else None
        if hooks is not None:
            snapshot = hooks.snapshot()
            fn.set_stats(stats_before)  # the eager forward pass folds the batch into these
        with pyro.validation_enabled(False):
            lp, grads = pot(chain.z, idx, hooks=hooks)
        stats_err = 0.0
        if hooks is not None:
            for a, b in zip(fn.stats(), stats_after, strict=True):
                scale = float(torch.linalg.vector_norm(a)) + 1e-30
                stats_err = max(stats_err, float(torch.linalg.vector_norm(a - b)) / scale)
            hooks.restore(snapshot)
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
        if not (lp_err <= tol and worst <= gtol and stats_err <= tol):
            raise CompileUnsupported(
                "the compiled log density, gradient or layer statistics disagree with the eager "
                f"potential's (relative errors: lp {lp_err:.3g}, gradient {worst:.3g}, "
                f"statistics {stats_err:.3g}; tolerances {tol:g}, {gtol:g}, {tol:g})"
            )
        self.verified = True

    def _finish(self, chain: ChainState, rep: list[float], t0: int) -> bool:
        kernel = self.kernel
        chain.lp, chain.gnorm = rep[_LP], rep[_GNORM]
        chain.rejected_in_row = int(rep[_RIR])
        self.functional.count_batches(int(rep[_ACC]))
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

"""Spike for issue 16: which mechanism compiles one SGLD update of a PyroModule BNN.

Not the implementation: a measurement to choose it. For each network (10-50-1 tanh MLP with a
Normal likelihood, N = 10,000; 784-400-400-10 ReLU MLP with a Categorical likelihood, random
data of MNIST shape, N = 10,000; batch 128; ``N(0, 1)`` ``PyroSample`` priors; the model is
``common.BayesNet``: weights touched before a subsampled ``pyro.plate``) and preconditioner
(identity, RMSprop), the contenders of ONE update, interleaved round-robin in one loop
(:func:`common.interleaved`) on one torch thread:

* ``hand eager``: a functional torch step (params dict -> F.linear forward -> loglik * N / B +
  log prior -> ``torch.autograd.grad`` -> ``theta + eps/2 grad + sqrt(eps) xi``, RMSprop's
  ``V`` and ``G`` in torch ops), the reference of every ratio; ``HandSGLD`` (bench_step's
  in-place ``nn.Module`` step) beside it;
* ``pyro_bnp eager``: ``pyro_bnp.SGLD.sample`` in a loop (as ``bench_step.py``);
* ``hand compile``: the hand step (``torch.func.grad_and_value`` inside) under
  ``torch.compile``: default options (inductor's own Gaussian generator), ``fallback_random``
  (aten's generator) with the noise drawn inside the graph and with ``xi`` drawn eagerly and
  passed in, and ``mode="max-autotune-no-cudagraphs"``;
* ``fx(pyro)``: THE KEY QUESTION. ``make_fx`` of ``torch.func.grad_and_value`` of a function
  ``(z_list, idx, data) -> lp`` that runs the *unchanged* Pyro model under pyro_bnp's potential
  machinery (the PyroModule cache filled with ``z``, ``_LogJoint`` injecting ``idx`` into the
  plate and summing the likelihood, closed-form priors): Pyro's Python handlers run once at
  trace time and only aten ops remain. The whole update (gradient, RMSprop state, move, noise
  passed in) is one FX graph, run (a) eagerly as a ``GraphModule`` and (b) under
  ``torch.compile`` (inductor). ``fx(pyro public)``: the same through Pyro's public handlers
  only (``poutine.condition`` of the sites and the plate's subsample site, ``trace``,
  ``log_prob_sum``). ``fx + stats``: ``fx(pyro)`` with forward pre-hooks that return each
  layer's input mean and variance as graph outputs and fold them into running statistics
  (what BNP's ``LayerHooks`` would become in a graph);
* ``dynamo on the potential``: ``torch._dynamo.explain`` of ``MinibatchPotential.__call__`` and
  of the model's log density (graph breaks and their reasons);
* noise: ``torch.randn`` eagerly (global and private generator) against inductor's generator and
  ``fallback_random`` in a compiled graph, ns per value, and whether the values agree.

Checked: the FX graphs' ``lp`` and gradient against the eager ``MinibatchPotential`` on new
indices (the indices are a graph input), and a chain of the FX update against
``pyro_bnp.SGLD`` itself fed the same generator stream (the kernel's own ``torch.Generator``
state cloned: same indices, same noise) over many updates. Compile times (first call, fresh
inductor cache) are reported separately from the per-update medians.

Run ``python benchmarks/spike_compile.py [--quick]`` (about 10 minutes; ``--quick`` about one,
10-50-1 identity only); writes ``benchmarks/results/spike_compile.json``. Findings:
docs/compile_spike.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch._dynamo
import torch.fx.experimental.proxy_tensor as proxy_tensor
import torch.nn.functional as F
from common import (
    BayesNet,
    HandSGLD,
    bench_parser,
    interleaved,
    machine_info,
    mlp,
    paired_ratio,
    site_values,
    strip_rounds,
    write_json,
)
from pyro import poutine
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

import pyro_bnp
from pyro_bnp.potential import MinibatchPotential, _LogJoint
from pyro_bnp.preconditioners import standard_normal_like

BATCH = 128
NUM_DATA = 10_000
STEP_SIZE = 1e-7
SIGMA = 0.1
RMS_ALPHA, RMS_EPS = 0.99, 1e-5  # pyro_bnp.RMSprop's defaults
CASES = {"mlp-10-50-1": ([10, 50, 1], nn.Tanh, "gaussian"),
         "mlp-784-400-400-10": ([784, 400, 400, 10], nn.ReLU, "categorical")}  # fmt: skip


# ------------------------------------------------------------------------------ set-up
def make_case(name: str, n: int, seed: int = 0) -> dict[str, Any]:
    """Return the plain network, data and likelihood of one case (as ``bench_step``)."""
    sizes, act, lik = CASES[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = mlp(sizes, act)
    if lik == "gaussian":
        x = torch.randn(n, sizes[0], generator=g)
        with torch.no_grad():
            y = mlp(sizes, act)(x).squeeze(-1) + SIGMA * torch.randn(n, generator=g)
    else:
        x = torch.rand(n, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (n,), generator=g)
    return {"name": name, "net": net, "x": x, "y": y, "likelihood": lik,
            "relu": act is nn.ReLU, "names": sorted(site_values(net))}  # fmt: skip


def error_text(exc: BaseException) -> str:
    """Return ``Type: message`` of an exception, the message cut at 600 characters."""
    msg = str(exc).strip().replace("\n", " | ")
    return f"{type(exc).__name__}: {msg[:600]}"


def rmsprop_v0(grads: list[Tensor]) -> list[Tensor]:
    """``V`` before the first update such that that update gives pyro_bnp's ``V = (g / N)^2``.

    pyro_bnp sets ``V`` from the first gradient; a graph that always computes
    ``alpha V + (1 - alpha) (g/N)^2`` gets the same value (up to rounding) from ``V = (g/N)^2``.
    """
    return [(g / NUM_DATA).square() for g in grads]


# ------------------------------------------------------------------------------ hand step
def hand_log_density(case: dict[str, Any]) -> Callable[..., Tensor]:
    """Return ``lp(params_list, xb, yb)``: loglik * N / B + log prior (constants dropped)."""
    relu, lik = case["relu"], case["likelihood"]
    scale = NUM_DATA / BATCH

    def lp(params: list[Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        # sorted site names: net.0.bias, net.0.weight, net.2.bias, ... -> (bias, weight) pairs
        h = xb
        layers = len(params) // 2
        for i in range(layers):
            h = F.linear(h, params[2 * i + 1], params[2 * i])
            if i < layers - 1:
                h = torch.relu(h) if relu else torch.tanh(h)
        if lik == "gaussian":
            ll = -0.5 / SIGMA**2 * (h.squeeze(-1) - yb).square().sum()
        else:
            ll = -F.cross_entropy(h, yb, reduction="sum")
        prior = sum(p.square().sum() for p in params)
        return scale * ll - 0.5 * prior

    return lp


def move(
    params: list[Tensor], grads_lp: list[Tensor], v: list[Tensor] | None, xi: list[Tensor]
) -> tuple[list[Tensor], list[Tensor] | None]:
    """SGLD move ``theta + eps/2 M grad lp + sqrt(eps) A xi`` (identity, or RMSprop with ``V``).

    Pure torch, no in-place ops (traceable); ``grads_lp`` is the gradient of ``lp``
    (``-grad U``). RMSprop as pyro_bnp: ``V <- alpha V + (1 - alpha) (g / N)^2``,
    ``G = 1 / (lambda + sqrt V)``, ``A = sqrt G``.
    """
    half, s = 0.5 * STEP_SIZE, math.sqrt(STEP_SIZE)
    if v is None:
        return [p + half * g + s * e for p, g, e in zip(params, grads_lp, xi, strict=True)], None
    new_v, out = [], []
    for p, g, e, vv in zip(params, grads_lp, xi, v, strict=True):
        gn = g * (1.0 / NUM_DATA)
        nv = vv * RMS_ALPHA + (1.0 - RMS_ALPHA) * gn * gn
        big_g = 1.0 / (nv.sqrt() + RMS_EPS)
        out.append(p + half * big_g * g + s * big_g.sqrt() * e)
        new_v.append(nv)
    return out, new_v


class HandStep:
    """The hand-written functional step, eager or under ``torch.compile``.

    ``noise``: ``"eager"`` (a private ``torch.Generator``, outside any graph), ``"inside"``
    (``torch.randn`` in the compiled function: inductor's generator, or aten's with
    ``fallback_random``) or ``"outside"`` (drawn eagerly, passed into the compiled function).
    """

    def __init__(
        self,
        case: dict[str, Any],
        rmsprop: bool,
        compile_kwargs: dict[str, Any] | None = None,
        noise: str = "eager",
        seed: int = 0,
    ) -> None:
        self.params = [site_values(case["net"])[k] for k in case["names"]]
        self.x, self.y = case["x"], case["y"]
        self.perm_g = torch.Generator().manual_seed(seed)
        self.noise_g = torch.Generator().manual_seed(seed + 1)
        self.perm, self.pos = torch.randperm(NUM_DATA, generator=self.perm_g), 0
        self.noise = noise
        lp = hand_log_density(case)
        self.v: list[Tensor] | None = None
        if rmsprop:
            xb, yb = self.x[:BATCH], self.y[:BATCH]
            g0 = torch.func.grad(lp)(self.params, xb, yb)
            self.v = rmsprop_v0(g0)
        grad_lp = torch.func.grad_and_value(lp)

        def step_fn(params, v, idx, x, y, xi):  # noqa: ANN001, ANN202
            g, value = grad_lp(params, x[idx], y[idx])
            if xi is None:
                xi = [torch.randn_like(p) for p in params]
            new, new_v = move(params, g, v, xi)
            return new, new_v, value

        self.compiled = compile_kwargs is not None
        self.fn = torch.compile(step_fn, **compile_kwargs) if compile_kwargs is not None else None
        self.lp = lp

    def indices(self) -> Tensor:
        """Return the next mini-batch (shuffled epochs)."""
        if self.pos + BATCH > NUM_DATA:
            self.perm, self.pos = torch.randperm(NUM_DATA, generator=self.perm_g), 0
        idx = self.perm[self.pos : self.pos + BATCH]
        self.pos += BATCH
        return idx

    def step(self) -> None:
        """One update (in the chosen mode)."""
        idx = self.indices()
        if self.fn is None:  # eager: autograd.grad on leaves
            leaves = [p.detach().requires_grad_() for p in self.params]
            value = self.lp(leaves, self.x[idx], self.y[idx])
            grads = torch.autograd.grad(value, leaves)
            with torch.no_grad():
                xi = [torch.randn(p.shape, generator=self.noise_g) for p in self.params]
                self.params, self.v = move(self.params, list(grads), self.v, xi)
            return
        xi = None
        if self.noise == "outside":
            xi = [torch.randn(p.shape, generator=self.noise_g) for p in self.params]
        self.params, self.v, _ = self.fn(self.params, self.v, idx, self.x, self.y, xi)


# ------------------------------------------------------------------------------ pyro -> FX
def model_log_density(
    pot: MinibatchPotential, model: Any, plate: str, stats: list[Tensor] | None = None
) -> Callable[..., Tensor]:
    """Return ``lp(z_list, idx, data)``: the model's mini-batch log joint as pyro_bnp's potential.

    The PyroModule cache is filled with ``z`` (the ``PyroSample`` weights never reach Pyro's
    handlers), ``_LogJoint`` injects ``idx`` into the plate and sums ``scale * log_prob`` of
    the other sites, the fixed Normal priors are added in closed form (in the graph, so autograd
    differentiates them). The model itself is unchanged. Assumes identity transforms (every
    site of ``BayesNet`` with a fixed sigma is real-valued).
    """
    names = sorted(pot.initial_params)
    assert pot.identity_sites == set(names), "the spike handles real-valued sites only"
    sites = pot._module_sites  # the cache-path sites (private: the spike reads them)
    ctx = model._pyro_context

    def lp(zs: list[Tensor], idx: Tensor, data: tuple[Tensor, ...]) -> Tensor:
        values = dict(zip(names, zs, strict=True))
        joint = _LogJoint(values, {plate: idx}, sites)
        with ctx:
            for name, site in sites.items():
                ctx.cache[site.fullname] = values[name]
            with joint:
                model(*data)
        total: Any = joint.total
        for name, site in sites.items():
            if site.iid is None:
                total = total + site.prior.log_prob(values[name]).sum()
                continue
            loc, inv_var, const = site.iid
            d = values[name].reshape(-1)
            d = d if loc == 0.0 else d - loc
            total = total + (const - 0.5 * inv_var * torch.dot(d, d))
        return total

    return lp


def public_log_density(model: Any, names: list[str], plate: str) -> Callable[..., Tensor]:
    """Return ``lp(z_list, idx, data)`` through Pyro's public handlers only.

    ``poutine.condition`` fixes every latent site and the plate's subsample site (its value is
    the index tensor), ``poutine.trace`` records the run, ``Trace.log_prob_sum`` adds up.
    """

    def lp(zs: list[Tensor], idx: Tensor, data: tuple[Tensor, ...]) -> Tensor:
        values: dict[str, Tensor] = dict(zip(names, zs, strict=True))
        values[plate] = idx
        tr = poutine.trace(poutine.condition(model, data=values)).get_trace(*data)
        return tr.log_prob_sum()

    return lp


@contextlib.contextmanager
def constant_tracking(limit: int) -> Any:
    """Raise ``make_fx``'s constant-tensor size limit (default 1) while tracing.

    pyro_bnp's one-pass Normal log density reads ``float(scale)`` of the likelihood's scale,
    a tensor the model makes from the float ``sigma`` and broadcasts to the batch; ``make_fx``
    tracks only 1-element tensors as constants, so the read fails without this.
    """
    old = proxy_tensor.CONSTANT_NUMEL_LIMIT
    proxy_tensor.CONSTANT_NUMEL_LIMIT = limit
    try:
        yield
    finally:
        proxy_tensor.CONSTANT_NUMEL_LIMIT = old


def fx_update(
    lp: Callable[..., Tensor],
    example: tuple[Any, ...],
    rmsprop: bool,
    with_stats: bool = False,
) -> tuple[torch.fx.GraphModule, float]:
    """Trace ONE whole update ``(z, v, idx, xi, data) -> (z', v', lp)`` with ``make_fx``.

    ``with_stats``: ``lp`` returns ``(lp, stats)`` (``has_aux``) and the graph returns the
    layers' batch statistics too. Returns the graph and the tracing time (s).
    """
    grad_lp = torch.func.grad_and_value(lp, has_aux=with_stats)

    def update(zs, v, idx, xi, data):  # noqa: ANN001, ANN202
        g, out = grad_lp(zs, idx, data)
        value, aux = out if with_stats else (out, [])
        new, new_v = move(zs, g, v if rmsprop else None, xi)
        return new, new_v, value, aux

    t0 = time.perf_counter()
    with constant_tracking(1 << 40), pyro.validation_enabled(False):
        gm = make_fx(update, tracing_mode="real")(*example)
    return gm, time.perf_counter() - t0


class FxChain:
    """A chain driven by an FX update graph (eager ``GraphModule`` or compiled)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        z: list[Tensor],
        v: list[Tensor] | None,
        data: tuple[Tensor, ...],
        stats_init: list[Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        self.fn, self.z, self.v, self.data = fn, list(z), v, data
        self.perm_g = torch.Generator().manual_seed(seed)
        self.noise_g = torch.Generator().manual_seed(seed + 1)
        self.perm, self.pos = torch.randperm(NUM_DATA, generator=self.perm_g), 0
        self.stats = stats_init

    def step(self) -> None:
        """One update: indices and noise drawn eagerly, then one call of the graph."""
        if self.pos + BATCH > NUM_DATA:
            self.perm, self.pos = torch.randperm(NUM_DATA, generator=self.perm_g), 0
        idx = self.perm[self.pos : self.pos + BATCH]
        self.pos += BATCH
        xi = [torch.randn(p.shape, generator=self.noise_g) for p in self.z]
        self.z, self.v, _, aux = self.fn(self.z, self.v, idx, xi, self.data)
        if self.stats is not None:  # running statistics: rho m + (1 - rho) m_B, same for var
            self.stats = [0.9 * s + 0.1 * a for s, a in zip(self.stats, aux, strict=True)]


def stats_hooks(model: Any, store: list[Tensor]) -> list[Any]:
    """Install forward pre-hooks on the model's Linear layers that append batch mean and var."""

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        h = args[0].detach()
        store.append(h.mean(0))
        store.append(h.var(0, unbiased=False))

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------ checks
def max_rel(a: list[Tensor], b: list[Tensor]) -> float:
    """Max over tensors of ``max|a - b| / max|b|``."""
    return max(
        float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
        for x, y in zip(a, b, strict=True)
    )


def check_potential(
    fn: Callable[..., Any], pot: MinibatchPotential, z: dict[str, Tensor], data: tuple, calls: int
) -> dict[str, Any]:
    """Compare ``fn`` (returning ``(grad lp, lp)``) with the eager potential on new indices."""
    names = sorted(z)
    zs = [z[k] for k in names]
    g = torch.Generator().manual_seed(123)
    worst_lp, worst_g = 0.0, 0.0
    for _ in range(calls):
        idx = torch.randperm(NUM_DATA, generator=g)[:BATCH]
        grads, value = fn(zs, idx, data)
        lp_ref, g_ref = pot(z, {"data": idx})
        worst_lp = max(worst_lp, abs(float(value) - lp_ref) / abs(lp_ref))
        worst_g = max(worst_g, max_rel([-x for x in grads], [g_ref[k] for k in names]))
    return {"calls": calls, "max_rel_lp": worst_lp, "max_rel_grad": worst_g,
            "ok": worst_lp < 1e-5 and worst_g < 1e-4}  # fmt: skip


def check_chain(
    case: dict[str, Any], pre: str, fn: Callable[..., Any], steps: int
) -> dict[str, Any]:
    """Run ``pyro_bnp.SGLD`` and the FX update ``steps`` updates on the SAME random stream.

    The kernel's generator state is cloned after set-up; the FX chain draws from the clone in
    the kernel's order (indices of the evaluation at the current point, then the noise of the
    move, site by site in sorted order), so both chains see the same indices and noise.
    Reported at checkpoints: ``max |z_fx - z_kernel|`` relative to the distance moved
    ``max |z_kernel - z_0|``; and, as a control, the same for the kernel against itself
    started from ``z_0`` perturbed by one float32 ulp (how fast rounding differences grow in
    this chain at all).
    """

    def new_kernel(perturb: bool) -> Any:
        model = BayesNet(case["net"], case["likelihood"], sigma=SIGMA)
        k = pyro_bnp.SGLD(model, STEP_SIZE, subsample_size={"data": BATCH}, preconditioner=pre)
        init = site_values(case["net"])
        if perturb:
            init = {n: torch.nextafter(v, torch.full_like(v, math.inf)) for n, v in init.items()}
        k.initial_params = init
        torch.manual_seed(7)
        k.setup(0, case["x"], case["y"])
        return k

    kernel, control = new_kernel(False), new_kernel(True)
    chain, pot = kernel.chain, kernel.potential
    assert chain is not None and pot is not None
    rng = torch.Generator()
    rng.set_state(chain.rng.get_state())
    perms: dict[str, Tensor] = {}
    pos: dict[str, int] = {}
    names = case["names"]
    z0 = dict(kernel.initial_params)
    z = [z0[k] for k in names]
    v = None
    if pre == "rmsprop":  # pyro_bnp's V starts at (g / N)^2 of the first gradient
        r2 = torch.Generator()
        r2.set_state(rng.get_state())
        idx0 = pot.next_indices({}, {}, r2)
        _, g0 = pot(z0, idx0)
        v = rmsprop_v0([-g0[k] for k in names])
    state = {"z": z0, "c": dict(control.initial_params)}
    checkpoints = sorted({c for c in (1, 10, 30, 100, 300, 1000) if c <= steps} | {steps})
    trail: dict[int, dict[str, float]] = {}
    for t in range(1, steps + 1):
        state["z"] = kernel.sample(state["z"])
        state["c"] = control.sample(state["c"])
        idx = pot.next_indices(perms, pos, rng)["data"]
        xi_d = standard_normal_like(dict(zip(names, z, strict=True)), rng)
        z, v, _, _ = fn(z, v, idx, [xi_d[k] for k in names], (case["x"], case["y"]))
        if t in checkpoints:
            zk = [state["z"][k] for k in names]
            moved = max(float((a - z0[k]).abs().max()) for a, k in zip(zk, names, strict=True))
            diff = max(float((a - b).abs().max()) for a, b in zip(z, zk, strict=True))
            ctrl = max(
                float((state["c"][k] - a).abs().max()) for a, k in zip(zk, names, strict=True)
            )
            trail[t] = {"fx_diff_over_moved": diff / moved, "control_diff_over_moved": ctrl / moved,
                        "max_moved": moved}  # fmt: skip
    kernel.cleanup()
    control.cleanup()
    last = trail[steps]
    return {"steps": steps, "trail": trail, "diff_over_moved": last["fx_diff_over_moved"],
            "control_diff_over_moved": last["control_diff_over_moved"],
            "ok": last["fx_diff_over_moved"] < 1e-3}  # fmt: skip


# ------------------------------------------------------------------------------ dynamo
def explain(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``torch._dynamo.explain``: graphs, graph breaks and (up to 8) distinct break reasons."""
    torch._dynamo.reset()
    try:
        with pyro.validation_enabled(False):
            ex = torch._dynamo.explain(fn)(*args)
    except Exception as exc:
        return {"error": error_text(exc)}
    reasons: list[str] = []
    for br in ex.break_reasons:
        text = str(getattr(br, "reason", br)).strip().splitlines()[0][:300]
        frame = br.user_stack[-1] if getattr(br, "user_stack", None) else None
        where = f" [{os.path.basename(frame.filename)}:{frame.lineno}]" if frame else ""
        if text + where not in reasons:
            reasons.append(text + where)
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
            "op_count": ex.op_count, "break_reasons": reasons[:8]}  # fmt: skip


# ------------------------------------------------------------------------------ noise
def noise_bench(quick: bool) -> dict[str, Any]:
    """Cost per value of Gaussian noise: eager generators against inductor's, and agreement."""
    out: dict[str, Any] = {}
    sizes = {"601 (10-50-1)": 601, "478,410 (784-400-400-10)": 478_410}
    if quick:
        sizes = {"601 (10-50-1)": 601}
    errors: dict[str, str] = {}

    def randn_fn(n: int) -> Callable[[], Tensor]:
        def f() -> Tensor:
            return torch.randn(n) * 1.0  # one op besides the generator (a graph needs output)

        return f

    for label, n in sizes.items():
        g = torch.Generator().manual_seed(0)
        contenders: dict[str, Callable[[], Any]] = {
            "eager randn (private generator)": lambda n=n, g=g: torch.randn(n, generator=g),
            "eager randn (global generator)": lambda n=n: torch.randn(n),
        }
        compiled = {}
        for tag, kw in (("inductor generator", {}), ("fallback_random", {"fallback_random": True})):
            torch._dynamo.reset()
            fn = torch.compile(randn_fn(n), options=kw or None)
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:
                errors[f"{label} {tag}"] = error_text(exc)
                continue
            compiled[tag] = time.perf_counter() - t0
            contenders[f"compiled randn ({tag})"] = fn
        timings = interleaved(contenders, warmup=3, budget_s=0.5 if quick else 4.0,
                              block_s=0.002 if quick else 0.01, min_rounds=3)  # fmt: skip
        per_value = {k: t["median_us"] * 1e3 / n for k, t in timings.items()}
        out[label] = {"ns_per_value": per_value, "compile_s": compiled}
    # do the compiled generators give eager's values under the same global seed?
    agree = {}
    for tag, kw in (("inductor generator", {}), ("fallback_random", {"fallback_random": True})):
        torch._dynamo.reset()
        fn = torch.compile(randn_fn(1000), options=kw or None)
        torch.manual_seed(3)
        a = fn()
        torch.manual_seed(3)
        b = torch.randn(1000)
        agree[tag] = {"equal_to_eager": bool(torch.equal(a, b)),
                      "mean": float(a.mean()), "std": float(a.std())}  # fmt: skip
    out["same_values_as_eager_randn"] = agree
    # a private torch.Generator passed into a compiled function
    g = torch.Generator().manual_seed(0)

    def with_gen() -> Tensor:
        return torch.randn(1000, generator=g) * 1.0

    out["private_generator_in_graph"] = explain(with_gen)
    torch._dynamo.reset()
    try:
        comp = torch.compile(with_gen, options={"fallback_random": True})
        g.manual_seed(5)
        a, a2 = comp(), comp()
        g.manual_seed(5)
        b, b2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
        out["private_generator_in_graph"]["compiled_equals_eager_two_calls"] = bool(
            torch.equal(a, b) and torch.equal(a2, b2)
        )
    except Exception as exc:
        out["private_generator_in_graph"]["compiled_error"] = error_text(exc)
    out["errors"] = errors
    return out


# ------------------------------------------------------------------------------ one case
def bench_case(name: str, pres: tuple[str, ...], args: Any) -> dict[str, Any]:
    """Build, check and time every contender of one network."""
    quick = args.quick
    case = make_case(name, NUM_DATA)
    x, y, names = case["x"], case["y"], case["names"]
    data = (x, y)
    z0 = site_values(case["net"])
    zs0 = [z0[k] for k in names]
    res: dict[str, Any] = {"case": name, "num_params": sum(v.numel() for v in zs0),
                           "compile_s": {}, "trace_s": {}, "errors": {}, "checks": {}}  # fmt: skip
    errors, compile_s = res["errors"], res["compile_s"]
    model = BayesNet(case["net"], case["likelihood"], sigma=SIGMA)
    pot = MinibatchPotential(model, data, subsample_size={"data": BATCH})
    res["fast_sites"] = sorted(pot.fast_sites)
    lp_model = model_log_density(pot, model, "data")
    idx_ex = torch.arange(BATCH)
    xi_ex = [torch.zeros_like(p) for p in zs0]
    vref = rmsprop_v0(zs0)

    # ---- what breaks: make_fx of the potential call itself, dynamo on it
    if name == "mlp-10-50-1" or not quick:
        try:
            with pyro.validation_enabled(False):
                make_fx(lambda z, i: pot(dict(zip(names, z, strict=True)), {"data": i}))(
                    zs0, idx_ex
                )
            res["make_fx_of_potential_call"] = "ok"
        except Exception as exc:
            res["make_fx_of_potential_call"] = error_text(exc)
        try:
            with pyro.validation_enabled(False):
                make_fx(torch.func.grad_and_value(lp_model))(zs0, idx_ex, data)
            res["make_fx_without_constant_tracking"] = "ok"
        except Exception as exc:
            res["make_fx_without_constant_tracking"] = error_text(exc)
        res["dynamo_explain_potential_call"] = explain(
            lambda z, i: pot(z, {"data": i}), dict(z0), idx_ex
        )
        res["dynamo_explain_model_log_density"] = explain(lp_model, zs0, idx_ex, data)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            res["dynamo_explain_potential_call_capture_scalars"] = explain(
                lambda z, i: pot(z, {"data": i}), dict(z0), idx_ex
            )
        # the public path on the model as built (its priors keep _validate_args=True)
        try:
            fx_update(public_log_density(model, names, "data"),
                      (zs0, None, idx_ex, xi_ex, data), rmsprop=False)  # fmt: skip
            res["public_path_model_built_with_validation"] = "ok"
        except Exception as exc:
            res["public_path_model_built_with_validation"] = error_text(exc)

    # ---- correctness of the log density + gradient graphs
    gv_graph, t_trace = None, None
    try:
        t0 = time.perf_counter()
        with constant_tracking(1 << 40), pyro.validation_enabled(False):
            gv_graph = make_fx(torch.func.grad_and_value(lp_model))(zs0, idx_ex, data)
        t_trace = time.perf_counter() - t0
        res["trace_s"]["lp+grad (pyro_bnp internals)"] = t_trace
        res["graph_nodes"] = len(gv_graph.graph.nodes)
        n_calls = 5 if quick else 20
        res["checks"]["lp+grad fx eager vs potential"] = check_potential(
            gv_graph, pot, z0, data, n_calls
        )
        torch._dynamo.reset()
        t0 = time.perf_counter()
        gv_comp = torch.compile(gv_graph)
        gv_comp(zs0, idx_ex, data)
        compile_s["lp+grad fx inductor"] = time.perf_counter() - t0
        res["checks"]["lp+grad fx inductor vs potential"] = check_potential(
            gv_comp, pot, z0, data, n_calls
        )
    except Exception as exc:
        errors["lp+grad fx"] = error_text(exc)
        traceback.print_exc()
    with pyro.validation_enabled(False):  # a model whose Distribution objects do not validate
        model_nv = BayesNet(case["net"], case["likelihood"], sigma=SIGMA)
    lp_public = public_log_density(model_nv, names, "data")
    try:
        t0 = time.perf_counter()
        with pyro.validation_enabled(False):
            pub_graph = make_fx(torch.func.grad_and_value(lp_public))(zs0, idx_ex, data)
        res["trace_s"]["lp+grad (public pyro)"] = time.perf_counter() - t0
        res["graph_nodes_public"] = len(pub_graph.graph.nodes)
        res["checks"]["lp+grad fx(public) eager vs potential"] = check_potential(
            pub_graph, pot, z0, data, 5 if quick else 20
        )
    except Exception as exc:
        errors["lp+grad fx(public)"] = error_text(exc)

    # ---- the contenders, per preconditioner
    res["timings"], res["ratio_to_hand"], res["paired_ratio_to_hand"] = {}, {}, {}
    budget = 3.0 if quick else (45.0 if name == "mlp-10-50-1" else 60.0)
    for pre in pres:
        rms = pre == "rmsprop"
        contenders: dict[str, Callable[[], Any]] = {}
        contenders["hand eager"] = HandStep(case, rms).step
        if not rms:
            hs = HandSGLD(copy.deepcopy(case["net"]), x, y, BATCH, STEP_SIZE, case["likelihood"])
            contenders["HandSGLD (bench_step's)"] = hs.step
        kernel = pyro_bnp.SGLD(
            BayesNet(case["net"], case["likelihood"], sigma=SIGMA),
            STEP_SIZE,
            subsample_size={"data": BATCH},
            preconditioner=pre,
        )
        kernel.initial_params = site_values(case["net"])
        kernel.setup(0, x, y)
        kstate = {"z": kernel.initial_params}

        def kstep(kernel: Any = kernel, kstate: dict = kstate) -> None:
            kstate["z"] = kernel.sample(kstate["z"])

        contenders["pyro_bnp eager"] = kstep
        variants: list[tuple[str, dict[str, Any], str]] = [
            ("hand compile default", {}, "inside"),
            ("hand compile fallback_random", {"options": {"fallback_random": True}}, "inside"),
        ]
        if quick:  # one compiled hand step only
            variants = variants[1:]
        elif not rms:
            variants.append(("hand compile, noise passed in", {}, "outside"))
            if not quick and not args.no_autotune:
                # mode and options cannot be combined: the noise is passed in instead
                variants.append(("hand compile max-autotune-no-cudagraphs, noise passed in",
                                 {"mode": "max-autotune-no-cudagraphs"}, "outside"))  # fmt: skip
        for label, kw, noise in variants:
            torch._dynamo.reset()
            try:
                hstep = HandStep(case, rms, kw, noise)
                t0 = time.perf_counter()
                hstep.step()
                compile_s[f"{pre}: {label}"] = time.perf_counter() - t0
                contenders[label] = hstep.step
            except Exception as exc:
                errors[f"{pre}: {label}"] = error_text(exc)
        # the Pyro model's whole update as one FX graph
        try:
            ex = (zs0, vref if rms else None, idx_ex, xi_ex, data)
            gm, t_tr = fx_update(lp_model, ex, rms)
            res["trace_s"][f"{pre}: update (pyro_bnp internals)"] = t_tr
            res["checks"][f"{pre}: fx eager chain vs pyro_bnp.SGLD"] = check_chain(
                case, pre, gm, 30 if quick else 300
            )
            contenders["fx(pyro) eager GraphModule"] = FxChain(
                gm, zs0, vref if rms else None, data
            ).step
            torch._dynamo.reset()
            comp = torch.compile(gm)
            t0 = time.perf_counter()
            comp(*ex)
            compile_s[f"{pre}: fx(pyro) inductor"] = time.perf_counter() - t0
            res["checks"][f"{pre}: fx inductor chain vs pyro_bnp.SGLD"] = check_chain(
                case, pre, comp, 30 if quick else 300
            )
            contenders["fx(pyro) inductor"] = FxChain(comp, zs0, vref if rms else None, data).step
        except Exception as exc:
            errors[f"{pre}: fx(pyro) update"] = error_text(exc)
            traceback.print_exc()
        if not rms and not quick:
            try:  # public handlers: the model built with validation off
                gm_pub, t_tr = fx_update(lp_public, (zs0, None, idx_ex, xi_ex, data), False)
                res["trace_s"][f"{pre}: update (public pyro)"] = t_tr
                torch._dynamo.reset()
                comp_pub = torch.compile(gm_pub)
                t0 = time.perf_counter()
                comp_pub(zs0, None, idx_ex, xi_ex, data)
                compile_s[f"{pre}: fx(pyro public) inductor"] = time.perf_counter() - t0
                contenders["fx(pyro public) inductor"] = FxChain(comp_pub, zs0, None, data).step
            except Exception as exc:
                errors[f"{pre}: fx(pyro public) update"] = error_text(exc)
            try:  # layer statistics from forward pre-hooks, as graph outputs
                store: list[Tensor] = []
                handles = stats_hooks(model, store)

                def lp_stats(zs, idx, d, store=store):  # noqa: ANN001, ANN202
                    store.clear()
                    value = lp_model(zs, idx, d)
                    return value, list(store)

                try:
                    gm_st, _ = fx_update(lp_stats, (zs0, None, idx_ex, xi_ex, data), False, True)
                finally:
                    for h in handles:
                        h.remove()
                torch._dynamo.reset()
                comp_st = torch.compile(gm_st)
                t0 = time.perf_counter()
                _, _, _, aux = comp_st(zs0, None, idx_ex, xi_ex, data)
                compile_s[f"{pre}: fx(pyro) + layer stats inductor"] = time.perf_counter() - t0
                ref_mean = x[idx_ex].mean(0)
                res["checks"]["layer stats from the graph: first layer's batch mean"] = {
                    "max_abs_diff": float((aux[0] - ref_mean).abs().max()),
                    "ok": bool(torch.allclose(aux[0], ref_mean, atol=1e-6)),
                }
                contenders["fx(pyro) + layer stats inductor"] = FxChain(
                    comp_st, zs0, None, data, stats_init=[a.clone() for a in aux]
                ).step
            except Exception as exc:
                errors[f"{pre}: fx(pyro) + layer stats"] = error_text(exc)
                traceback.print_exc()
        timings = interleaved(contenders, warmup=2 if quick else 20, budget_s=budget,
                              block_s=0.002 if quick else 0.02, min_rounds=3)  # fmt: skip
        kernel.cleanup()
        res["timings"][pre] = strip_rounds(timings)
        res["ratio_to_hand"][pre] = {
            c: timings[c]["median_us"] / timings["hand eager"]["median_us"] for c in timings
        }
        res["paired_ratio_to_hand"][pre] = {
            c: paired_ratio(timings, c, "hand eager") for c in timings
        }
    return res


def print_table(result: dict[str, Any]) -> None:
    """Print the per-update medians, ratios and compile times."""
    for c in result["cases"]:
        for pre, timings in c["timings"].items():
            print(f"\n== {c['case']} ({c['num_params']:,} params), {pre}")
            print(
                f"{'contender':44s} {'median':>10s} {'x hand':>7s} {'paired':>7s} {'compile':>8s}"
            )
            for name, t in timings.items():
                comp = c["compile_s"].get(f"{pre}: {name}")
                comp_s = f"{comp:7.1f}s" if comp is not None else ""
                print(f"{name:44s} {t['median_us']:8.0f}us "
                      f"{c['ratio_to_hand'][pre][name]:7.2f} "
                      f"{c['paired_ratio_to_hand'][pre][name]:7.2f} {comp_s:>8s}")  # fmt: skip
        for k, v in c["checks"].items():
            print(f"  check {k}: {v}")
        for k, v in c["errors"].items():
            print(f"  ERROR {k}: {v}")
    noise = result.get("noise", {})
    for label, v in noise.items():
        if isinstance(v, dict) and "ns_per_value" in v:
            cells = ", ".join(f"{k} {ns:.2f}" for k, ns in v["ns_per_value"].items())
            print(f"\nnoise {label}: ns/value: {cells}")


FINDINGS = (
    "make_fx_of_potential_call",
    "make_fx_without_constant_tracking",
    "public_path_model_built_with_validation",
    "dynamo_explain_potential_call",
    "dynamo_explain_model_log_density",
    "dynamo_explain_potential_call_capture_scalars",
)


def main() -> None:
    parser = bench_parser(__doc__, "spike_compile")
    parser.add_argument("--no-autotune", action="store_true", help="skip max-autotune")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # compile times from a cold cache: a fresh inductor cache directory for this process
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="spike_inductor_")
    torch._dynamo.config.cache_size_limit = 64
    t_start = time.perf_counter()
    if args.quick:
        plan = [("mlp-10-50-1", ("identity",))]
    else:
        plan = [("mlp-10-50-1", ("identity", "rmsprop")),
                ("mlp-784-400-400-10", ("identity", "rmsprop"))]  # fmt: skip
    cases = []
    for name, pres in plan:
        t0 = time.perf_counter()
        cases.append(bench_case(name, pres, args))
        cases[-1]["case_wall_s"] = time.perf_counter() - t0
        print(f"[{name}: {cases[-1]['case_wall_s']:.0f} s]", flush=True)
    result: dict[str, Any] = {
        "benchmark": "spike_compile",
        "quick": args.quick,
        "machine": machine_info(),
        "step_size": STEP_SIZE,
        "batch_size": BATCH,
        "num_data": NUM_DATA,
        "cases": cases,
    }
    result["noise"] = noise_bench(args.quick)
    result["wall_s"] = time.perf_counter() - t_start
    print_table(result)
    print(f"\nnoise agreement: {result['noise']['same_values_as_eager_randn']}")
    print(f"private generator in a graph: {result['noise']['private_generator_in_graph']}")
    for c in cases:
        for k in FINDINGS:
            if k in c:
                print(f"{c['case']} {k}: {c[k]}")
    write_json(Path(args.out), result)
    print(f"wrote {args.out} (total {result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""The compiled update (``compile=``, pyro_bnp.compiled): the same chain, the same guards.

``compile="trace"`` runs the traced aten graph as it is (no inductor: fast to build), so most
tests use it; the inductor tests compile once per graph and are few (the rest are marked slow).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from bnp_models import LinearRegression
from conftest import max_rel
from pyro.infer import MCMC
from sgld_models import badly_scaled_features, conjugate_linreg, gaussian_target, linreg
from test_exact_posteriors import _check_variance_law, _conjugate_check, _stack

from pyro_bnp import BNP, SGHMC, SGLD, RMSprop

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _draws(kernel, *args, num_samples=200, warmup_steps=0, seed=1):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run(*args)
    return mcmc.get_samples(), kernel


def _data(dtype=torch.float32):
    x, y = badly_scaled_features(400, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    return x.to(dtype), y.to(dtype)


def _kernel(cls, pre, compile, **kw):
    kw.setdefault("subsample_size", {"data": 40})
    step = 1e-4 if cls is SGLD else 1e-2
    extra = {"friction": 5.0} if cls is SGHMC else {}
    return cls(linreg, step, preconditioner=pre, compile=compile, **extra, **kw)


@pytest.mark.parametrize("cls", [SGLD, SGHMC], ids=["sgld", "sghmc"])
@pytest.mark.parametrize("pre", ["identity", "rmsprop"])
def test_traced_chain_equals_eager_chain(cls, pre):
    """1000 updates under one seed: the traced graph follows the eager chain within rounding."""
    x, y = _data()
    eager, _ = _draws(_kernel(cls, pre, False), x, y, num_samples=1000)
    traced, kernel = _draws(_kernel(cls, pre, "trace"), x, y, num_samples=1000)
    assert kernel._compiled is not None and kernel._compiled.verified
    # float32 rounding of the same equation written in another order
    assert max_rel(traced, eager) < 1e-4, max_rel(traced, eager)


@pytest.mark.parametrize("checks", ["host", "device"])
def test_rmsprop_frozen_after_warmup_traced_equals_eager(checks):
    """The frozen flag is a graph input: V stops changing at the end of warmup, as eagerly."""
    x, y = _data()
    runs = []
    for comp in (False, "trace"):
        pre = RMSprop(freeze_after_warmup=True)
        k = SGLD(linreg, 1e-4, subsample_size={"data": 40}, preconditioner=pre, compile=comp,
                 compile_options={"checks": checks} if comp else None)  # fmt: skip
        samples, _ = _draws(k, x, y, num_samples=200, warmup_steps=100)
        v_end = {n: v.clone() for n, v in pre.v.items()}
        runs.append((samples, v_end, pre.frozen))
    (se, ve, fe), (sc, vc, fc) = runs
    assert fe and fc
    assert max_rel(sc, se) < 1e-4
    assert max_rel(vc, ve) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_checks_equal_host_checks(dtype):
    """Selecting on the device (the GPU mode) gives the host mode's chain bit for bit."""
    x, y = _data(dtype)
    out = {}
    for checks in ("host", "device"):
        k = _kernel(SGLD, "rmsprop", "trace", compile_options={"checks": checks}, thin=3)
        out[checks], kernel = _draws(k, x, y, num_samples=100)
        assert kernel._compiled.host_checks == (checks == "host")
        assert all(v.dtype == dtype for v in out[checks].values())
    for k in out["host"]:
        assert torch.equal(out["host"][k], out["device"][k]), k


@pytest.mark.parametrize("cls", [SGLD, SGHMC], ids=["sgld", "sghmc"])
@pytest.mark.parametrize("pre", ["identity", "rmsprop", "bnp+rmsprop"])
def test_unrolled_updates_equal_one_update_per_call(cls, pre):
    """``unroll=4`` makes the 4 updates of a draw one graph call: the same operations in the
    same order as four calls, so the traced chains are equal bit for bit (the first update of
    a chain is always a call of one: it is checked against the eager potential)."""
    out = {}
    for unroll in (1, 4):
        opts = {"checks": "device", "unroll": unroll}
        if pre == "bnp+rmsprop":
            samples, _, k = _bnp_run(cls, BNP(rmsprop=RMSprop()), "trace", "device",
                                     num_samples=30, thin=4, compile_options=opts)  # fmt: skip
        else:
            k = _kernel(cls, pre, "trace", compile_options=opts, thin=4)
            samples, _ = _draws(k, *_data(), num_samples=30)
        assert set(k._compiled._fns) == ({1} if unroll == 1 else {1, 4})
        out[unroll] = samples, k.chain.t
    for name in out[1][0]:
        assert torch.equal(out[1][0][name], out[4][0][name]), name
    assert out[1][1] == out[4][1] == 120


class _HostReads:
    """Count the tensor reads into Python (``item``, ``tolist``, ``float``, ``bool``, ...): each
    is a device synchronisation on a GPU. Without a GPU this is how the hot path is checked."""

    METHODS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("pre", ["identity", "bnp+rmsprop"])
@pytest.mark.parametrize("unroll", [1, 4])
def test_device_checks_read_the_host_once_per_draw_not_per_update(monkeypatch, pre, unroll):
    """With ``checks="device"`` a draw of 8 updates reads the device as often as a draw of 1
    (the counters, once per draw), whether the 8 are one graph call each or two calls of 4; with
    ``checks="host"`` every update adds its reads."""
    from test_devices import MLP

    x, y = _data()
    per_draw = {}
    for checks, thin in (("device", 1), ("device", 8), ("host", 1), ("host", 8)):
        if checks == "host" and unroll > 1:
            continue
        model = MLP("cpu", torch.float32) if pre != "identity" else linreg
        pre_obj = BNP(rmsprop=RMSprop()) if pre != "identity" else "identity"
        opts = {"checks": checks, "unroll": unroll if thin % unroll == 0 else 1}
        k = SGLD(model, 1e-4, subsample_size={"data": 40}, preconditioner=pre_obj,
                 compile="trace", compile_options=opts, thin=thin)  # fmt: skip
        _draws(k, x, y, num_samples=3)  # traced, verified, in its sampling phase
        last = k._returned  # what Pyro passes back: the chain's cached state, no evaluation
        assert last is not None
        reads = _HostReads(monkeypatch)
        k.sample(last)
        per_draw[checks, thin] = reads.count
        monkeypatch.undo()
        assert k._compiled is not None and k._compiled.verified
    assert per_draw["device", 8] == per_draw["device", 1] == 1, per_draw  # the counters
    if unroll == 1:
        assert per_draw["host", 8] == 8 * per_draw["host", 1], per_draw


def test_unrolled_sghmc_resamples_the_momentum_where_eager_does():
    """``resample_momentum=10`` with ``unroll=4``: a call never spans a resampling point (the
    draws that would are made one update per call), so the chain equals one call per update
    bit for bit."""
    out = []
    for unroll in (1, 4):
        k = _kernel(SGHMC, "identity", "trace", thin=4, resample_momentum=10,
                    compile_options={"checks": "device", "unroll": unroll})  # fmt: skip
        out.append(_draws(k, *_data(), num_samples=60)[0])
        assert set(k._compiled._fns) == ({1} if unroll == 1 else {1, 4})
    for name in out[0]:
        assert torch.equal(out[0][name], out[1][name]), name


def test_inductor_chain_equals_eager_chain():
    """The inductor-compiled update: same chain within float32 rounding over 1000 updates."""
    x, y = _data()
    eager, _ = _draws(_kernel(SGLD, "rmsprop", False), x, y, num_samples=1000)
    compiled, kernel = _draws(_kernel(SGLD, "rmsprop", True), x, y, num_samples=1000)
    assert kernel._compiled is not None and kernel._compiled.verified
    assert kernel._compiled.compile_seconds > 0
    assert max_rel(compiled, eager) < 1e-4, max_rel(compiled, eager)


def test_graph_is_reused_across_chains():
    x, y = _data()
    kernel = _kernel(SGLD, "identity", "trace")
    pyro.set_rng_seed(0)
    for _ in range(2):  # Pyro's sequential chains set the one kernel up again
        MCMC(kernel, num_samples=20, warmup_steps=5, disable_progbar=True).run(x, y)
        assert kernel._compiled is not None
    assert len(kernel._graphs) == 1


# -- rejections and explosions ---------------------------------------------------------------
def _cliff(c: float = 0.5):
    """N(0, 1) with the region x > c cut off: a proposal there has log density -inf."""
    x = pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.factor("cliff", torch.where(x.max() > c, -math.inf, 0.0))


# the guard modes: host, device, and device with the two updates of a draw in one call
CHECKS = {"host": {"checks": "host"}, "device": {"checks": "device"},
          "unrolled": {"checks": "device", "unroll": 2}}  # fmt: skip


@pytest.mark.parametrize("checks", list(CHECKS))
def test_rejections_match_the_eager_kernel(checks):
    """No plate, so no index stream: rejected updates keep the random streams aligned."""
    runs = {}
    for comp in (False, "trace"):
        options = CHECKS[checks] if comp else None
        k = SGLD(_cliff, 0.3, preconditioner="identity", compile=comp, thin=2,
                 compile_options=options, max_rejections=50)  # fmt: skip
        samples, kernel = _draws(k, num_samples=300)
        runs[comp] = samples, kernel.diagnostics()
    (se, de), (sc, dc) = runs[False], runs["trace"]
    assert sum(de["diverging"]) > 20  # the test has power: many rejected updates
    assert dc["diverging"] == de["diverging"]
    assert torch.allclose(sc["x"], se["x"], rtol=1e-5, atol=1e-6)
    assert torch.all(sc["x"] <= 0.5)


@pytest.mark.parametrize("checks", list(CHECKS))
def test_max_rejections_raises_and_keeps_the_chain(checks):
    k = SGLD(_cliff, 50.0, preconditioner="identity", compile="trace", max_rejections=5,
             compile_options=CHECKS[checks], thin=2)  # fmt: skip
    k.initial_params = {"x": torch.full((3,), -0.1)}
    pyro.set_rng_seed(0)
    with pytest.raises(RuntimeError, match="5 updates in a row"):
        MCMC(k, num_samples=50, disable_progbar=True).run()
    assert torch.isfinite(k.chain.z["x"]).all() and k.chain.z["x"].max() <= 0.5
    assert math.isfinite(k.chain.lp)


@pytest.mark.parametrize("checks", list(CHECKS))
def test_explosion_is_named_and_the_chain_kept(checks):
    # eps / (2 sigma^2) = 2.5: the chain grows by a factor 1.5 per update, finite all along
    k = SGLD(gaussian_target, 5.0, preconditioner="identity", compile="trace",
             max_abs_param=1e3, thin=4, compile_options=CHECKS[checks])  # fmt: skip
    pyro.set_rng_seed(0)
    with pytest.raises(RuntimeError, match=r"exploding: update \d+ moved a parameter.*e\.g\."):
        MCMC(k, num_samples=50, disable_progbar=True).run(torch.zeros(3), 1.0)
    assert max(float(v.abs().max()) for v in k.chain.z.values()) <= 1e3


# -- fallbacks -------------------------------------------------------------------------------
def test_pyromodule_cache_path_traced_equals_eager():
    """PyroSample weights through the module cache, closed-form priors in the graph."""
    x, y = (t.double() for t in _data())
    runs = []
    for comp in (False, "trace"):
        k = SGLD(LinearRegression(3), 1e-4, preconditioner="identity", compile=comp,
                 subsample_size={"data": 40})  # fmt: skip
        samples, kernel = _draws(k, x, y, num_samples=500)
        assert kernel.potential.fast_sites == {"linear.weight", "linear.bias"}
        runs.append(samples)
    assert max_rel(runs[1], runs[0]) < 1e-10


class _MyRMSprop(RMSprop):
    """A user's subclass: its update may differ from RMSprop's, so it is not compiled."""


def test_unsupported_preconditioner_warns_under_true_and_is_silent_under_auto():
    """A preconditioner class without a compiled form: a named warning under True, none under
    "auto", and the chain is the eager one."""
    x, y = _data()

    def kernel(comp):
        return _kernel(SGLD, _MyRMSprop(), comp)

    with pytest.warns(RuntimeWarning, match=r"_MyRMSprop\) has no compiled form"):
        _, k = _draws(kernel(True), x, y, num_samples=5)
    assert k._compiled is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile:")
        eager, _ = _draws(kernel(False), x, y, num_samples=5)
        auto, k_auto = _draws(kernel("auto"), x, y, num_samples=5)
    for name in eager:
        assert torch.equal(auto[name], eager[name])
    # silent, but not invisible: the reason is in the diagnostics
    report = k_auto.diagnostics()["compile"]
    assert report["mode"] == "'auto'" and not report["compiled"]
    assert "_MyRMSprop) has no compiled form" in report["fallback"]


def test_compile_report_says_what_ran():
    """``diagnostics()["compile"]`` (:meth:`SGLD.compile_report`): eager, then compiled and
    verified with its guard mode and compile times; exported to ArviZ with the diagnostics."""
    import json

    from pyro_bnp import from_pyro

    x, y = _data()
    k = _kernel(SGLD, "rmsprop", False)
    assert k.compile_report()["fallback"] == "compile=False"
    mcmc = MCMC(k, num_samples=5, warmup_steps=0, disable_progbar=True)
    mcmc.run(x, y)
    assert k.diagnostics()["compile"] == {
        "mode": "False", "compiled": False, "fallback": "compile=False", "verified": False,
        "checks": None, "unroll": 1, "trace_s": None, "inductor_s": None,
    }  # fmt: skip
    k = _kernel(SGLD, "rmsprop", "trace", compile_options={"checks": "device", "unroll": 2})
    assert k.compile_report()["fallback"] == "not started"
    mcmc = MCMC(k, num_samples=6, warmup_steps=0, disable_progbar=True)
    mcmc.run(x, y)
    report = k.diagnostics()["compile"]
    assert report["compiled"] and report["verified"] and report["fallback"] is None
    assert (report["checks"], report["unroll"], report["inductor_s"]) == ("device", 2, None)
    assert report["trace_s"] > 0
    idata = from_pyro(mcmc, log_likelihood=False)
    exported = json.loads(idata.sample_stats.attrs["pyro_diagnostics"])["compile"]
    assert exported == [report]  # one per chain


def test_bnp_prior_cap_traced_chain_equals_eager_chain():
    """``BNP(prior_cap=1.0)`` where the cap binds (nearly constant inputs, a stiff prior) under
    a decreasing step size: the cap (s^2 floored, q enlarged) is computed in the graph from the
    statistics and the step size, and the chain follows the eager one."""
    from test_bnp_stability import _ConstantInputs
    from test_bnp_stability import _data as constant_data

    from pyro_bnp import schedules

    x, y = constant_data()
    runs = []
    for comp in (False, "trace"):
        pre = BNP(prior_cap=1.0)
        k = SGLD(_ConstantInputs(), schedules.polynomial(2e-4, 50.0), subsample_size={"data": 20},
                 preconditioner=pre, compile=comp)  # fmt: skip
        samples, _ = _draws(k, x, y, num_samples=300)
        runs.append((samples, pre.layer_summary()["fc"]["q2"]))
    (se, qe), (st, qt) = runs
    assert k._compiled is not None and k._compiled.verified
    assert qe > 1.01  # the cap binds: q^2 above its balance factor max(3 / 20, 1) = 1
    assert max_rel(st, se) < 1e-4, max_rel(st, se)
    assert qt == pytest.approx(qe, rel=1e-5)


def _bnp_run(cls, pre, comp, checks="host", num_samples=1000, warmup_steps=0, **kw):
    from test_devices import MLP

    x, y = _data()
    # (SGHMC moves this network's first layer ~10 prior sds out: the health check would warn)
    extra = {"friction": 5.0, "health": None} if cls is SGHMC else {}
    step = 1e-4 if cls is SGLD else 1e-3
    opts = kw.pop("compile_options", {"checks": checks} if comp else None)
    k = cls(MLP("cpu", torch.float32), step, subsample_size={"data": 40}, preconditioner=pre,
            compile=comp, compile_options=opts, **extra, **kw)  # fmt: skip
    samples, _ = _draws(k, x, y, num_samples=num_samples, warmup_steps=warmup_steps)
    layers = {n: (b.ref.stats.mean.clone(), b.ref.stats.var.clone(), b.ref.stats.num_batches)
              for n, b in pre._blocks.items()}  # fmt: skip
    return samples, layers, k


# both guard modes, spread over the samplers (they give the same chain: test above)
@pytest.mark.parametrize(("cls", "checks"), [(SGLD, "host"), (SGHMC, "device")],
                         ids=["sgld-host", "sghmc-device"])  # fmt: skip
@pytest.mark.parametrize("rms", [False, True], ids=["bnp", "bnp+rmsprop"])
def test_bnp_traced_chain_equals_eager_chain(cls, rms, checks):
    """BNP's layer statistics are graph state: over 1000 updates of a 3-8-1 network the draws
    and the running statistics of both layers follow the eager chain within float32 rounding,
    and the same number of batches is folded in."""
    runs = [
        _bnp_run(cls, BNP(rmsprop=RMSprop() if rms else None), comp, checks)
        for comp in (False, "trace")
    ]
    (se, le, _), (st, lt, k) = runs
    assert k._compiled is not None and k._compiled.verified
    assert max_rel(st, se) < 1e-4, max_rel(st, se)
    for name, (mean, var, count) in le.items():
        assert lt[name][2] == count == 1001
        assert float((lt[name][0] - mean).abs().max() / mean.abs().max()) < 1e-4
        assert float((lt[name][1] - var).abs().max() / var.abs().max()) < 1e-4


@pytest.mark.parametrize(("cls", "checks", "rms"), [(SGLD, "host", True), (SGHMC, "device", False)],
                         ids=["sgld-host-bnp+rmsprop", "sghmc-device-bnp"])  # fmt: skip
def test_bnp_inductor_chain_equals_eager_chain(cls, checks, rms):
    """``compile=True`` (inductor, what users get) with BNP on the CPU: 1000 updates within
    float32 rounding of the eager chain, statistics and folded-batch counts included."""
    runs = [
        _bnp_run(cls, BNP(rmsprop=RMSprop() if rms else None), comp, checks)
        for comp in (False, True)
    ]
    (se, le, _), (sc, lc, k) = runs
    assert k._compiled is not None and k._compiled.verified and k._compiled.compile_seconds > 0
    assert max_rel(sc, se) < 1e-4, max_rel(sc, se)
    for name, (mean, var, count) in le.items():
        assert max_rel({"m": lc[name][0], "v": lc[name][1]}, {"m": mean, "v": var}) < 1e-4
        assert lc[name][2] == count == 1001  # the first evaluation and 1000 updates


@pytest.mark.parametrize("cls", [SGLD, SGHMC], ids=["sgld", "sghmc"])
def test_bnp_others_traced_chain_equals_eager_chain(cls):
    """``BNP(others="rmsprop")``: BNP on the layers, RMSprop on the noise scale outside them."""
    from test_devices import MLP

    x, y = _data()
    runs = []
    for comp in (False, "trace"):
        pre = BNP(others="rmsprop")
        extra = {"friction": 5.0, "health": None} if cls is SGHMC else {}
        k = cls(MLP("cpu", torch.float32, latent_noise=True), 1e-4 if cls is SGLD else 1e-3,
                subsample_size={"data": 40}, preconditioner=pre, compile=comp, **extra)  # fmt: skip
        samples, _ = _draws(k, x, y, num_samples=1000)
        runs.append((samples, dict(pre.others.v)))
    (se, ve), (st, vt) = runs
    assert k._compiled is not None and k._compiled.verified
    assert set(vt) == {"sigma"}
    assert max_rel(st, se) < 1e-4, max_rel(st, se)
    assert max_rel(vt, ve) < 1e-4


def test_bnp_frozen_after_warmup_traced_equals_eager():
    """The frozen flag stops the statistics (and BNP+RMSprop's V) at the end of warmup."""
    runs = [
        _bnp_run(
            SGLD,
            BNP(rmsprop=RMSprop(), freeze_after_warmup=True),
            comp,
            "device",
            num_samples=200,
            warmup_steps=100,
        )  # fmt: skip
        for comp in (False, "trace")
    ]
    (se, le, _), (st, lt, k) = runs
    assert k.preconditioner.frozen and k._compiled is not None
    assert max_rel(st, se) < 1e-4
    for name, (mean, _, count) in le.items():
        assert lt[name][2] == count == 101  # the first evaluation and 100 warmup updates
        assert float((lt[name][0] - mean).abs().max() / mean.abs().max()) < 1e-4


def test_bnp_statistics_that_disagree_with_the_hooks_fall_back(monkeypatch):
    """The first accepted update's layer statistics are checked against the eager hooks'
    (the same batch folded into the same statistics): 5 % off warns and runs eagerly."""
    from pyro_bnp.compiled import _BNPState

    observe = _BNPState.observe
    monkeypatch.setattr(
        _BNPState, "observe", lambda self, *a: [1.05 * t for t in observe(self, *a)]
    )
    with pytest.warns(RuntimeWarning, match=r"statistics 0\.0"):
        _, _, k = _bnp_run(SGLD, BNP(), "trace", num_samples=20)
    assert k._compiled is None


def _reads_a_float(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = 1.0 + 0.0 * float(w.detach().sum())  # a host read: cannot be traced
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, s), obs=y[idx])


def test_untraceable_model_warns_once_and_stays_eager():
    x, y = _data()
    opts = {"subsample_size": {"data": 40}, "preconditioner": "identity"}
    eager, _ = _draws(SGLD(_reads_a_float, 1e-4, **opts), x, y)
    with pytest.warns(RuntimeWarning, match="tracing the update with make_fx failed"):
        out, k = _draws(SGLD(_reads_a_float, 1e-4, compile="auto", **opts), x, y)
    assert k._compiled is None
    assert torch.equal(out["w"], eager["w"])  # nothing was lost: the eager chain exactly


def test_a_graph_that_disagrees_with_the_eager_potential_falls_back(monkeypatch):
    """The first accepted update is checked against the eager potential: a graph whose log
    density is 5 % off (so is its gradient) warns with both errors and the chain goes on eagerly
    from where it was."""
    from pyro_bnp.potential import MinibatchPotential

    x, y = _data()
    opts = {"subsample_size": {"data": 40}, "preconditioner": "identity"}
    eager, _ = _draws(SGLD(linreg, 1e-4, **opts), x, y, num_samples=50)
    log_joint = MinibatchPotential.log_joint
    monkeypatch.setattr(MinibatchPotential, "log_joint", lambda *a, **k: 1.05 * log_joint(*a, **k))
    with pytest.warns(RuntimeWarning, match=r"disagree with the eager potential's .*lp 0\.0"):
        out, k = _draws(SGLD(linreg, 1e-4, compile="trace", **opts), x, y, num_samples=50)
    assert k._compiled is None
    assert max_rel(out, eager) < 1e-4


def test_an_inductor_failure_falls_back_with_its_reason():
    """An option inductor cannot honour here (an unknown config key) warns and stays eager."""
    x, y = _data()
    opts = {"subsample_size": {"data": 40}, "preconditioner": "identity"}
    eager, _ = _draws(SGLD(linreg, 1e-4, **opts), x, y, num_samples=20)
    with pytest.warns(RuntimeWarning, match="inductor failed to compile the traced update"):
        out, k = _draws(SGLD(linreg, 1e-4, compile=True, compile_options={"no_such_option": 1},
                             **opts), x, y, num_samples=20)  # fmt: skip
    assert k._compiled is None
    assert torch.equal(out["w"], eager["w"])


def test_bad_compile_arguments_are_named():
    with pytest.raises(ValueError, match="compile must be False, True, 'auto' or 'trace'"):
        SGLD(linreg, compile="yes")
    with pytest.raises(ValueError, match="compile_options must be a dict"):
        SGLD(linreg, compile=True, compile_options=["max_autotune"])
    k = SGLD(linreg, compile="trace", compile_options={"checks": "gpu"}, preconditioner="identity")
    x, y = _data()
    with pytest.raises(ValueError, match=r"compile_options\['checks'\]"):
        _draws(k, x, y, num_samples=2)
    bad = [({"unroll": 0}, r"compile_options\['unroll'\] must be a positive int"),
           ({"unroll": 2, "checks": "host"}, "unroll > 1 needs checks='device'")]  # fmt: skip
    for opts, match in bad:
        k = SGLD(linreg, compile="trace", compile_options=opts, preconditioner="identity")
        with pytest.raises(ValueError, match=match):
            _draws(k, x, y, num_samples=2)


def test_resume_from_state_dict_continues_the_compiled_chain():
    x, y = _data()
    full, _ = _draws(_kernel(SGLD, "rmsprop", "trace"), x, y, num_samples=60)
    k = _kernel(SGLD, "rmsprop", "trace")
    first, _ = _draws(k, x, y, num_samples=30)
    state = k.state_dict()
    k2 = _kernel(SGLD, "rmsprop", "trace")
    k2.load_state_dict(state)
    rest, _ = _draws(k2, x, y, num_samples=30, seed=123)  # another global seed: no effect
    for name in full:
        assert torch.allclose(torch.cat([first[name], rest[name]]), full[name], rtol=1e-6)


# -- exact posteriors on the compiled path ---------------------------------------------------
def test_gaussian_law_identity_compiled(seed):
    d, sigma, eps = 100, 1.5, 4.5  # eps / (4 sigma^2) = 0.5: the variance doubles
    loc = torch.linspace(-3, 3, d, dtype=torch.float64)
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity", compile=True)
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=3000, warmup_steps=200, disable_progbar=True)
    mcmc.run(loc, sigma)
    assert kernel._compiled is not None
    draws = mcmc.get_samples(group_by_chain=True)["theta"]
    predicted = torch.full((d,), sigma**2 / (1 - eps / (4 * sigma**2)), dtype=torch.float64)
    _check_variance_law(draws, predicted, torch.full((d,), sigma**2, dtype=torch.float64))


@pytest.mark.slow
def test_conjugate_regression_rmsprop_compiled(seed):
    n, batch, prior, noise, eps = 2000, 100, 10.0, 1.0, 5e-6
    x, y = badly_scaled_features(n, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    pre = RMSprop(freeze_after_warmup=True)
    kernel = SGLD(conjugate_linreg, eps, subsample_size={"data": batch}, preconditioner=pre,
                  compile=True)  # fmt: skip
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=15000, warmup_steps=3000, disable_progbar=True)
    mcmc.run(x, y, prior, noise)
    assert kernel._compiled is not None
    g = pre.diagonal()
    m = torch.diag(torch.cat([g["b"].reshape(1), g["w"]]).double())
    _conjugate_check(_stack(mcmc.get_samples(group_by_chain=True)), x, y, prior, noise, eps,
                     batch, m=m)  # fmt: skip


# -- CUDA ------------------------------------------------------------------------------------
@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("comp", [False, True])
def test_runs_on_cuda(comp):
    x, y = (t.cuda() for t in _data())
    samples, kernel = _draws(_kernel(SGLD, "rmsprop", comp), x, y, num_samples=50)
    assert all(v.device.type == "cuda" for v in kernel.chain.z.values())
    assert all(torch.isfinite(v).all() for v in samples.values())
    if comp:
        assert kernel._compiled is not None and not kernel._compiled.host_checks


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("unroll", [1, 4])
def test_cuda_draw_synchronises_once_whatever_thin(unroll):
    """On CUDA, ``torch.cuda.set_sync_debug_mode`` counts the synchronisations of one draw:
    as many for 8 updates as for 1 (the counters, read once per draw)."""
    x, y = (t.cuda() for t in _data())
    syncs = {}
    for thin in (1, 8):
        opts = {"checks": "device", "unroll": unroll}
        k = _kernel(SGLD, "rmsprop", True, thin=thin, compile_options=opts)
        _draws(k, x, y, num_samples=3)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                k.sample(k._returned)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[thin] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs[8] == syncs[1] >= 1, syncs


@pytest.mark.slow
def test_bench_compiled_quick_runs(tmp_path):
    """``benchmarks/bench_compiled.py --quick`` runs and writes finite timings."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compiled.json"
    proc = subprocess.run(
        [sys.executable, "bench_compiled.py", "--quick", "--cases", "mlp-10-50-1",
         "--out", str(out)],
        cwd=root / "benchmarks", capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    case = json.loads(out.read_text())["cases"][0]
    assert all(t["median_us"] > 0 for t in case["timings"].values())
    assert {"identity compiled", "rmsprop compiled", "hand"} <= set(case["timings"])

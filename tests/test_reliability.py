"""Long runs survive interruption, faults and bad input (issue: reliability)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import arviz_stats as azs
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from reliability_models import InterruptedBNN, data, make_kernel
from seams import WrappedPotential
from sgld_models import gaussian_target, linreg, make_linreg_data

import pyro_bnp.store as store_module
from pyro_bnp import SGLD
from pyro_bnp.store import load_store, sample_to_store

HERE = Path(__file__).resolve().parent


def _posterior(dt):
    return {k: np.asarray(v.values) for k, v in dt["posterior"].data_vars.items()}


def _store_run(store, num_samples, seed):
    """Seed Pyro with ``seed``, then stream a new kernel's chain on ``data()`` into ``store``.

    A store that already holds a run is continued (up to ``num_samples`` draws in all).
    """
    x, y = data()
    pyro.set_rng_seed(seed)
    return sample_to_store(
        make_kernel(),
        store,
        x,
        y,
        num_samples=num_samples,
        warmup_steps=30,
        every=50,
        progress=False,
    )


def test_resume_through_store_equals_uninterrupted(tmp_path):
    full = _store_run(tmp_path / "a", 400, seed=1)
    _store_run(tmp_path / "b", 200, seed=1)
    # a different global seed at resume time
    resumed = _store_run(tmp_path / "b", 400, seed=12345)
    a, b = _posterior(full), _posterior(resumed)
    assert a.keys() == b.keys() and a["sigma"].shape == (1, 400)
    for k in a:
        assert torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k])), k
    for k in ("lp", "step_size", "grad_norm"):
        assert np.array_equal(full["sample_stats"][k].values, resumed["sample_stats"][k].values)


def _interrupted_then_resumed(tmp_path, name, *, model_call=None, store_call=None):
    """One run stopped by KeyboardInterrupt (in the model or in the store hook), resumed."""
    x, y = data()
    directory = tmp_path / name
    settings = {"num_samples": 60, "warmup_steps": 10, "every": 10, "progress": False}
    real_call = store_module.DrawStore.__call__
    calls = {"n": 0}

    def interrupting_call(self, *args):
        calls["n"] += 1
        if calls["n"] == store_call:
            raise KeyboardInterrupt
        return real_call(self, *args)

    pyro.set_rng_seed(1)
    net = None if model_call is None else InterruptedBNN(model_call)  # (draws weights: seeded)
    with pytest.raises(KeyboardInterrupt):
        if store_call is not None:
            store_module.DrawStore.__call__ = interrupting_call
        try:
            sample_to_store(make_kernel(net), directory, x, y, load=False, **settings)
        finally:
            store_module.DrawStore.__call__ = real_call
    pyro.set_rng_seed(777)  # the global seed at resume time does not matter
    sample_to_store(make_kernel(), directory, x, y, load=False, **settings)
    return load_store(directory)


def test_interrupt_at_random_moments_resumes_exactly(tmp_path):
    """Ctrl-C at 20 random moments (inside an update's model run, or between a draw and its
    recording): the resumed store equals the uninterrupted run bit for bit."""
    x, y = data()
    pyro.set_rng_seed(1)
    sample_to_store(
        make_kernel(), tmp_path / "ref", x, y, num_samples=60, warmup_steps=10, every=10,
        progress=False, load=False,
    )  # fmt: skip
    reference = load_store(tmp_path / "ref")
    ref = _posterior(reference)
    rng = np.random.default_rng(2026)
    moments = [("model", int(k)) for k in rng.integers(1, 140, size=14)]
    moments += [("store", int(k)) for k in rng.integers(1, 70, size=6)]
    for i, (where, k) in enumerate(moments):
        kw = {"model_call": k} if where == "model" else {"store_call": k}
        resumed = _interrupted_then_resumed(tmp_path, f"run{i}", **kw)
        got = _posterior(resumed)
        for site in ref:
            assert np.array_equal(got[site], ref[site]), (where, k, site)
        for stat in ("lp", "step_size", "grad_norm"):
            assert np.array_equal(
                resumed["sample_stats"][stat].values, reference["sample_stats"][stat].values
            ), (where, k, stat)


def test_resume_with_mcmc_equals_uninterrupted():
    """The documented way with pyro's MCMC: state_dict, new kernel, load_state_dict, run."""
    x, y = data()
    pyro.set_rng_seed(2)
    k_full = make_kernel()
    m_full = MCMC(k_full, num_samples=400, warmup_steps=20, disable_progbar=True)
    m_full.run(x, y)
    pyro.set_rng_seed(2)
    k1 = make_kernel()
    m1 = MCMC(k1, num_samples=200, warmup_steps=20, disable_progbar=True)
    m1.run(x, y)
    state = k1.state_dict()
    pyro.set_rng_seed(777)
    k2 = make_kernel()
    k2.load_state_dict(state)
    m2 = MCMC(k2, num_samples=200, warmup_steps=0, disable_progbar=True)
    m2.run(x, y)
    full, first, second = m_full.get_samples(), m1.get_samples(), m2.get_samples()
    for k in full:
        assert torch.equal(full[k], torch.cat([first[k], second[k]])), k
    assert k_full.diagnostics()["lp"][200:] == k2.diagnostics()["lp"]


def test_kill_leaves_readable_store(tmp_path):
    store = tmp_path / "store"
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill_target.py"), str(store)],
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 900  # a hang guard, generous for a loaded machine
        while not (store / "part-000002.nc").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run wrote no draws in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    dt = load_store(store)
    n = dt["posterior"].sizes["draw"]
    assert n >= 30 and n % 10 == 0
    summary = azs.summary(dt, var_names=["sigma"])
    assert np.isfinite(summary["mean"].to_numpy()).all()
    # The killed run continues from its last checkpoint.
    x, y = data()
    more = sample_to_store(
        make_kernel(), store, x, y, num_samples=n + 20, warmup_steps=20, every=10, progress=False
    )
    assert more["posterior"].sizes["draw"] == n + 20
    assert np.array_equal(
        more["posterior"]["sigma"].values[0, :n], dt["posterior"]["sigma"].values[0]
    )


def test_load_store_with_model_gives_log_likelihood(tmp_path):
    x, y = data(120)
    pyro.set_rng_seed(3)
    kernel = make_kernel()
    dt = sample_to_store(kernel, tmp_path, x, y, num_samples=40, every=15, progress=False)
    assert dt["log_likelihood"]["obs"].shape == (1, 40, 120)
    assert set(dt["sample_stats"].data_vars) >= {"lp", "step_size", "grad_norm", "diverging"}
    with pytest.raises(ValueError, match="already holds a run"):
        sample_to_store(kernel, tmp_path, x, y, num_samples=40, resume=False, progress=False)


def test_same_seed_same_draws_sequential_chains(monkeypatch):
    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)
    x, y = make_linreg_data(100)
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        kernel = SGLD(linreg, step_size=1e-3, subsample_size={"data": 20}, preconditioner="rmsprop")
        with pytest.warns(UserWarning, match="sequentially"):
            mcmc = MCMC(kernel, num_samples=50, warmup_steps=10, num_chains=2, disable_progbar=True)
        mcmc.run(x, y)
        runs.append(mcmc.get_samples(group_by_chain=True))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])
        assert not torch.equal(runs[0][k][0], runs[0][k][1])  # the chains differ


def test_nan_in_data_is_reported_before_sampling():
    x, y = make_linreg_data(50)
    y[17] = float("nan")
    kernel = SGLD(linreg, step_size=1e-3, preconditioner="identity")
    with pytest.raises(ValueError, match=r"'y' \(shape \(50,\)\) at index \(17,\)"):
        kernel.setup(0, x, y)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'x' \(shape \(50, 3\)\) at index \(3, 1\)"):
        kernel.setup(0, x, y)


def test_exploding_chain_is_detected():
    kernel = SGLD(
        gaussian_target,
        step_size=5.0,
        preconditioner="identity",
        temperature=0.0,
        max_abs_param=1e6,
    )
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=0, disable_progbar=True)
    with pytest.raises(RuntimeError, match=r"exploding: update \d+ .*try a smaller step size"):
        mcmc.run(torch.ones(3), 1.0)


def test_state_dict_rejects_a_foreign_state():
    x, y = make_linreg_data(50)
    kernel = SGLD(linreg, step_size=1e-3, preconditioner="identity")
    with pytest.raises(ValueError, match="not a pyro_bnp.SGLD state_dict"):
        kernel.load_state_dict({"z": {}})
    with pytest.raises(RuntimeError, match="needs a chain"):
        kernel.state_dict()

    def other(x, y):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    kernel.setup(0, x, y)
    state = kernel.state_dict()
    k2 = SGLD(other, step_size=1e-3, preconditioner="identity")
    k2.load_state_dict(state)
    with pytest.raises(ValueError, match="saved chain has sites"):
        k2.setup(0, x, y)


def test_rejected_proposal_leaves_layer_statistics_unchanged():
    """BNP statistics only ever see the forward passes of accepted states."""
    x, y = data(100)
    pyro.set_rng_seed(4)
    kernel = make_kernel()
    kernel.setup(0, x, y)
    params = kernel.sample(kernel.initial_params)
    before = {
        layer.name: (layer.stats.mean.clone(), layer.stats.var.clone(), layer.stats.num_batches)
        for layer in kernel.layers
    }
    real = kernel.potential
    kernel.potential = WrappedPotential(real, fail=True)  # evaluates, then reports NaN
    same = kernel.sample(params)
    assert all(torch.equal(same[k], params[k]) for k in params)
    assert kernel.last_draw_stats()["diverging"]
    for layer in kernel.layers:
        mean, var, count = before[layer.name]
        assert torch.equal(layer.stats.mean, mean) and torch.equal(layer.stats.var, var)
        assert layer.stats.num_batches == count
    kernel.potential = real
    kernel.sample(same)
    assert all(layer.stats.num_batches == before[layer.name][2] + 2 for layer in kernel.layers)

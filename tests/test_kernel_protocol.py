"""The kernel honours Pyro's MCMCKernel protocol, subsamples correctly and fails clearly.

Covers: per-chain reset (Pyro reuses one kernel for sequential chains), a cheap ``setup(0)``
without hooks, transforms and constrained output, ``logging``/``diagnostics``/``summary``,
thinning and schedules, sequential and spawned multi-chain runs (also BNP with hooks),
``save_params``, ``hook_fn``, ``initial_params``, ``StreamingMCMC``, shuffled epochs, rejection
of non-finite steps, input validation and the BNP path on a ``PyroModule`` BNN.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing
from protocol_models import BNN, Faulty, Recorder, make_bnn_data
from pyro.infer import MCMC
from pyro.infer.mcmc.api import StreamingMCMC
from seams import WrappedPotential, evaluate
from sgld_models import gaussian_target, linreg, make_linreg_data

from pyro_bnp import SGLD, RMSprop
from pyro_bnp.schedules import Cyclical, Polynomial

DIAG_KEYS = {"lp", "step_size", "grad_norm", "diverging", "divergences"}
BNN_SITES = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "sigma"}


def _linreg_data(n: int = 50):
    x, y = make_linreg_data(n=n, d=3, seed=2)
    return x.double(), y.double()


def _num_hooks(net: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in net.modules())


def _mcmc(kernel, num_samples, warmup_steps, **kw) -> MCMC:
    return MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True, **kw
    )


# -- set-up ---------------------------------------------------------------------------------
def test_setup_is_cheap_and_installs_no_hooks(seed):
    x, y = make_bnn_data(n=40)
    net = BNN()
    kernel = SGLD(net, step_size=1e-4, preconditioner="bnp", subsample_size={"data": 8})
    kernel.setup(0, x, y)
    assert net.seen == [(8, 3)], "setup runs the model once, on one batch"
    assert _num_hooks(net) == 0 and kernel.layers == ()
    assert set(kernel.transforms) == BNN_SITES
    assert set(kernel.initial_params) == BNN_SITES

    kernel.setup(3, x, y)
    z = kernel.initial_params
    for _ in range(3):
        z = kernel.sample(z)
        assert _num_hooks(net) == 2  # fc1 and fc2, while sampling
    assert net.seen[2:] == [(8, 3)] * 4  # initial gradient + 3 updates, all on batches
    kernel.cleanup()
    assert _num_hooks(net) == 0
    kernel.cleanup()  # idempotent


def test_setup_resets_all_chain_state(seed):
    x, y = make_bnn_data(n=40)
    net = BNN()
    kernel = SGLD(net, step_size=1e-4, preconditioner="bnp+rmsprop", subsample_size={"data": 10})
    kernel.setup(2, x, y)
    first = {k: v.clone() for k, v in kernel.initial_params.items()}
    seed1 = kernel.diagnostics()["rng_seed"]
    z = first
    for _ in range(5):
        z = kernel.sample(z)
    old_stats = [ref.stats for ref in kernel.layers]
    assert all(s.num_batches == 6 for s in old_stats)
    assert kernel.preconditioner.rmsprop.v and len(kernel.diagnostics()["lp"]) == 3

    kernel.setup(2, x, y)  # a new chain
    assert _num_hooks(net) == 0, "setup removes the previous chain's hooks"
    pre = kernel.preconditioner
    assert pre.rmsprop.v == {} and pre.layer_summary() == {} and not pre.frozen
    assert kernel.chain.t == 0 and kernel.chain.draw == 0 and not kernel.chain.started
    assert kernel.layers == () and kernel.chain.perms == {} and kernel.chain.rejected_in_row == 0
    diag = kernel.diagnostics()
    assert all(diag[k] == [] for k in DIAG_KEYS) and diag["warmup_divergences"] == 0
    assert diag["rng_seed"] != seed1
    assert any(not torch.equal(first[k], kernel.initial_params[k]) for k in first)
    kernel.sample(kernel.initial_params)
    new_stats = [ref.stats for ref in kernel.layers]
    assert all(s.num_batches == 2 for s in new_stats), "fresh layer statistics"
    assert not any(a is b for a in new_stats for b in old_stats)
    kernel.cleanup()


def test_transforms_and_constrained_samples(seed):
    x, y = _linreg_data()
    unconstrained = []
    kernel = SGLD(linreg, step_size=1e-3, preconditioner="identity")
    mcmc = _mcmc(
        kernel,
        num_samples=10,
        warmup_steps=3,
        hook_fn=lambda k, params, stage, i: unconstrained.append(params["s"].clone()),
    )
    mcmc.run(x, y)
    # Pyro's convention: transforms map constrained -> unconstrained
    t = kernel.transforms
    assert torch.allclose(t["s"](torch.tensor(2.0)), torch.tensor(math.log(2.0)))
    assert torch.equal(t["w"](torch.tensor([-1.0, 3.0])), torch.tensor([-1.0, 3.0]))
    s = mcmc.get_samples()["s"]
    assert s.shape == (10,) and torch.all(s > 0)
    assert torch.equal(s, torch.exp(torch.stack(unconstrained[3:])))


def test_logging_diagnostics_and_summary(seed, capsys):
    x, y = _linreg_data()
    kernel = SGLD(linreg, step_size=1e-3, preconditioner="rmsprop")
    logs = []
    mcmc = _mcmc(
        kernel, num_samples=6, warmup_steps=2, hook_fn=lambda k, *_: logs.append(k.logging())
    )
    mcmc.run(x, y)
    assert len(logs) == 8
    for log in logs:
        assert type(log) is OrderedDict and log
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in log.items())
    diag = kernel.diagnostics()
    assert DIAG_KEYS <= set(diag)
    assert all(len(diag[k]) == 6 for k in ("lp", "step_size", "grad_norm", "diverging"))
    assert diag["divergences"] == [] and diag["step_size"] == [1e-3] * 6
    assert all(math.isfinite(v) for v in diag["lp"]) and min(diag["grad_norm"]) > 0
    summary = mcmc.diagnostics()
    assert DIAG_KEYS <= set(summary) and set(summary["lp"]) == {"chain 0"}
    mcmc.summary()
    assert "Number of divergences: 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "schedule",
    [Polynomial(a=2e-3, b=1.0, gamma=0.55), Cyclical(2e-3, num_steps=27, num_cycles=2)],
    ids=["polynomial", "cyclical"],
)
def test_thin_counts_evaluations_and_records_schedule(seed, schedule):
    warmup, num_samples, thin = 4, 5, 3
    x, y = _linreg_data()
    model = Recorder()
    kernel = SGLD(model, step_size=schedule, preconditioner="identity", thin=thin)
    mcmc = _mcmc(kernel, num_samples=num_samples, warmup_steps=warmup)
    mcmc.run(x, y)
    # one evaluation per update and one at the initial point, plus the set-up trace
    assert len(model.calls) == (warmup + num_samples) * thin + 1 + 1
    expected = [schedule((warmup + i + 1) * thin - 1) for i in range(num_samples)]
    assert kernel.diagnostics()["step_size"] == expected  # last update of each draw
    assert len(set(expected)) == num_samples
    assert kernel.chain.t == (warmup + num_samples) * thin


# -- several chains -------------------------------------------------------------------------
def test_sequential_chains_are_fresh(seed, monkeypatch):
    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)
    x, y = _linreg_data()
    n = x.shape[0]
    pre = RMSprop()
    kernel = SGLD(linreg, step_size=1e-3, preconditioner=pre)
    starts = []

    def hook(k, params, stage, i):
        if stage.startswith("Warmup") and i == 0:  # after the first draw of each chain
            _, g0 = evaluate(k, k.initial_params)
            # V of a fresh chain is (g0 / N)^2 from the first gradient; a V carried over from
            # the previous chain would be far off. (Not bitwise: the kernel multiplies by 1/N.)
            fresh = all(
                torch.allclose(pre.v[s], (g0[s] / n).square(), rtol=1e-6, atol=0.0) for s in g0
            )
            starts.append((k.chain.t, k.chain.draw, fresh, k.diagnostics()["rng_seed"]))

    with pytest.warns(UserWarning, match="sequentially"):
        mcmc = _mcmc(kernel, num_samples=6, warmup_steps=3, num_chains=2, hook_fn=hook)
    mcmc.run(x, y)
    assert [s[:3] for s in starts] == [(1, 1, True), (1, 1, True)]
    assert starts[0][3] != starts[1][3]
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples["w"].shape == (2, 6, 3)
    assert not torch.allclose(samples["w"][0], samples["w"][1])
    for chain in range(2):
        diag = mcmc._diagnostics[chain]
        assert DIAG_KEYS <= set(diag) and len(diag["lp"]) == 6
    assert mcmc._diagnostics[0].keys() == mcmc._diagnostics[1].keys()


def test_initial_params_per_chain_save_params_and_hook(seed, monkeypatch):
    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)
    x, y = _linreg_data()
    init = {
        "w": torch.tensor([[3.0, -3.0, 3.0], [-2.0, 2.0, -2.0]], dtype=torch.float64),
        "b": torch.tensor([2.0, -2.0], dtype=torch.float64),
        "s": torch.tensor([math.log(0.5), math.log(2.0)], dtype=torch.float64),
    }
    calls = []
    kernel = SGLD(linreg, step_size=1e-6, preconditioner="identity")
    with pytest.warns(UserWarning, match="sequentially"):
        mcmc = _mcmc(
            kernel,
            num_samples=3,
            warmup_steps=2,
            num_chains=2,
            initial_params=init,
            save_params=["w", "s"],
            hook_fn=lambda k, params, stage, i: calls.append((stage, i)),
        )
    mcmc.run(x, y)
    assert calls == [
        (f"{stage} [{c}]", i)
        for c in range(2)
        for stage, n in (("Warmup", 2), ("Sample", 3))
        for i in range(n)
    ]
    samples = mcmc.get_samples(group_by_chain=True)
    assert set(samples) == {"w", "s"}  # given unsorted: Pyro unpacks in sorted order
    assert kernel.save_params == ["s", "w"]
    for c in range(2):  # each chain starts (and, with a tiny step, stays) at its own point
        assert torch.allclose(samples["w"][c, 0], init["w"][c], atol=0.02)
        assert torch.allclose(samples["s"][c, 0], init["s"][c].exp(), rtol=0.05)


@pytest.mark.parametrize("model", ["linreg", "bnn"])
def test_parallel_chains_in_spawned_processes(seed, monkeypatch, model):
    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    if model == "linreg":
        x, y = _linreg_data()
        net = None
        kernel = SGLD(linreg, step_size=1e-3, preconditioner="rmsprop", subsample_size=10)
        scale = "s"
    else:
        x, y = make_bnn_data(n=40)
        net = BNN()
        kernel = SGLD(net, step_size=1e-4, preconditioner="bnp", subsample_size={"data": 10})
        scale = "sigma"
    pickle.dumps(kernel)
    mcmc = _mcmc(kernel, num_samples=5, warmup_steps=3, num_chains=2, mp_context="spawn")
    mcmc.run(x, y)
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples[scale].shape == (2, 5) and torch.all(samples[scale] > 0)
    assert all(torch.isfinite(v).all() for v in samples.values())
    assert not torch.equal(samples[scale][0], samples[scale][1])
    assert mcmc._diagnostics[0].keys() == mcmc._diagnostics[1].keys()
    for chain in range(2):
        assert DIAG_KEYS <= set(mcmc._diagnostics[chain])
        assert len(mcmc._diagnostics[chain]["lp"]) == 5
    assert mcmc._diagnostics[0]["rng_seed"] != mcmc._diagnostics[1]["rng_seed"]
    if net is not None:
        # the parent only ran setup(0) for the transforms: one batch, no hooks
        assert net.seen == [(10, 3)]
        assert _num_hooks(net) == 0 and kernel.hooks is None


def test_streaming_mcmc(seed):
    x, y = _linreg_data()
    kernel = SGLD(linreg, step_size=1e-3, preconditioner="identity")
    mcmc = StreamingMCMC(kernel, num_samples=20, warmup_steps=5, disable_progbar=True)
    mcmc.run(x, y)
    stats = mcmc.get_statistics(group_by_chain=False)
    assert set(stats) == {"w", "b", "s"} and stats["s"]["count"] == 20
    assert stats["s"]["mean"] > 0  # constrained
    diag = mcmc.diagnostics()
    assert DIAG_KEYS <= set(diag) and len(diag["lp"]["chain 0"]) == 20


# -- subsampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [50, 53])
def test_epochs_without_replacement(seed, n):
    x, y = _linreg_data(n)
    batch = 10
    model = Recorder()
    kernel = SGLD(model, step_size=1e-4, preconditioner="identity", subsample_size={"data": 10})
    kernel.setup(0, x, y)
    assert torch.equal(model.calls[0], torch.arange(batch))  # set-up: the first rows
    z = kernel.initial_params
    per_epoch = n // batch
    for _ in range(3 * per_epoch - 1):
        z = kernel.sample(z)
    evals = model.calls[1:]
    assert len(evals) == 3 * per_epoch and all(len(i) == batch for i in evals)
    epochs = [torch.cat(evals[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
    for idx in epochs:  # every row at most once per epoch, all of them when B divides N
        assert len(idx.unique()) == per_epoch * batch and idx.max() < n
        if n % batch == 0:
            assert torch.equal(idx.sort().values, torch.arange(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    assert not torch.equal(epochs[0].sort().values, epochs[0])  # shuffled


def two_plates(x: torch.Tensor, y: torch.Tensor, seen: list) -> None:
    """A latent per feature in a ``features`` plate; observations in the ``data`` plate."""
    with pyro.plate("features", x.shape[1]):
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]) as idx:
        seen.append(len(idx))
        pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def two_observed_plates(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])
    with pyro.plate("more", x.shape[0]) as idx:
        pyro.sample("y2", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def test_int_subsample_size_finds_the_observation_plate(seed):
    x, y = _linreg_data()
    seen: list = []
    kernel = SGLD(two_plates, step_size=1e-4, preconditioner="identity", subsample_size=5)
    kernel.setup(0, x, y, seen)
    assert seen == [50], "an int spec costs one full-data run at set-up"
    assert kernel.potential.plates == {"data": (50, 5)} and kernel.subsample_size == {"data": 5}
    assert kernel.potential.num_data == 50
    z = kernel.initial_params
    for _ in range(3):
        z = kernel.sample(z)
    assert seen[1:] == [5] * 4
    with pytest.raises(ValueError, match=r"exactly one plate with observations.*'data', 'more'"):
        SGLD(two_observed_plates, subsample_size=5).setup(0, x, y)


def test_model_that_subsamples_itself(seed):
    x, y = _linreg_data()
    model = Recorder(subsample_size=8)
    kernel = SGLD(model, step_size=1e-4, preconditioner="rmsprop")
    mcmc = _mcmc(kernel, num_samples=4, warmup_steps=2)
    mcmc.run(x, y)
    assert kernel.potential.own_plates == {"data": (50, 8)} and kernel.potential.plates == {}
    assert kernel.potential.num_data == 50  # RMSprop's per-datum scale uses N, not B
    assert len(model.calls) == 8 and all(len(i) == 8 for i in model.calls)
    assert torch.all(mcmc.get_samples()["s"] > 0)


# -- faults ---------------------------------------------------------------------------------
def test_non_finite_steps_are_rejected(seed):
    loc = torch.zeros(4, dtype=torch.float64)
    # calls: 0 set-up, 1 initial gradient, 1 + t after update t
    model = Faulty(nan_lp_at={3}, nan_grad_at={5})
    kernel = SGLD(model, step_size=0.1, preconditioner="identity")
    kernel.setup(0, loc)
    draws = [kernel.initial_params]
    for _ in range(5):
        draws.append(kernel.sample(draws[-1]))
    assert model.calls == 7
    assert torch.equal(draws[2]["theta"], draws[1]["theta"])  # NaN log density
    assert torch.equal(draws[4]["theta"], draws[3]["theta"])  # NaN gradient
    for i in (1, 3, 5):
        assert not torch.equal(draws[i]["theta"], draws[i - 1]["theta"])
    diag = kernel.diagnostics()
    assert diag["diverging"] == [False, True, False, True, False]
    assert diag["divergences"] == [1, 3]
    assert all(math.isfinite(v) for v in diag["lp"] + diag["grad_norm"])
    assert kernel.logging()["div"] == "2"


def test_divergences_reach_mcmc_summary(seed, capsys):
    loc = torch.zeros(4, dtype=torch.float64)
    warmup = 2
    # draw d (0-based, warmup included) is evaluated by call 2 + d
    model = Faulty(nan_lp_at={2 + 0, 2 + warmup + 1})
    kernel = SGLD(model, step_size=0.1, preconditioner="identity")
    mcmc = _mcmc(kernel, num_samples=4, warmup_steps=warmup)
    mcmc.run(loc)
    diag = mcmc.diagnostics()
    assert diag["divergences"] == {"chain 0": [1]}
    assert diag["diverging"] == {"chain 0": [False, True, False, False]}
    assert diag["warmup_divergences"] == {"chain 0": 1}
    mcmc.summary()
    assert "Number of divergences: 1" in capsys.readouterr().out


def test_max_rejections_in_a_row_raise(seed):
    model = Faulty(nan_from=3)
    kernel = SGLD(model, step_size=0.1, preconditioner="identity", max_rejections=4)
    mcmc = _mcmc(kernel, num_samples=5, warmup_steps=10)
    with pytest.raises(RuntimeError, match=r"4 updates in a row.*try a smaller one"):
        mcmc.run(torch.zeros(2, dtype=torch.float64))
    assert model.calls == 3 + 4


def test_non_finite_proposal_is_rejected_without_evaluation(seed):
    loc = torch.zeros(2, dtype=torch.float64)
    kernel = SGLD(gaussian_target, step_size=1e10, preconditioner="identity")
    kernel.setup(0, loc, 1e-150)  # gradient 1e300 * theta: the proposal overflows
    z0 = {"theta": torch.ones(2, dtype=torch.float64)}
    kernel.potential = counting = WrappedPotential(kernel.potential)
    z1 = kernel.sample(z0)
    assert torch.equal(z1["theta"], z0["theta"]) and counting.calls == 1  # only the start
    assert kernel.diagnostics()["diverging"] == [True]


def test_non_finite_initial_point_is_an_error(seed):
    kernel = SGLD(Faulty(nan_lp_at={1}), preconditioner="identity")
    mcmc = _mcmc(kernel, num_samples=2, warmup_steps=0)
    with pytest.raises(ValueError, match="gradient at the initial point is not finite"):
        mcmc.run(torch.zeros(2))


def test_sample_from_another_state_recomputes_the_gradient(seed):
    """Pyro passes back the state the kernel returned; any other state is evaluated anew."""
    loc, scale, eps = torch.zeros(3, dtype=torch.float64), 0.5, 0.01
    kernel = SGLD(gaussian_target, step_size=eps, preconditioner="identity", temperature=0)
    kernel.setup(0, loc, scale)
    z = kernel.sample(kernel.initial_params)
    z = kernel.sample(z)
    other = {"theta": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    new = kernel.sample(other)
    expected = other["theta"] - eps / 2 * (other["theta"] - loc) / scale**2
    torch.testing.assert_close(new["theta"], expected, rtol=1e-14, atol=0.0)
    with pytest.raises(ValueError, match=r"sample\(\) needs the latent sites \['theta'\]"):
        kernel.sample({"phi": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"params\['theta'\] has shape \(2,\)"):
        kernel.sample({"theta": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="before setup"):
        SGLD(gaussian_target).sample(other)


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_size": 0.0}, "step_size must be positive"),
        ({"step_size": -1e-3}, "step_size must be positive"),
        ({"step_size": math.nan}, "step_size must be positive"),
        ({"step_size": math.inf}, "step_size must be positive"),
        ({"step_size": "big"}, "step_size must be a number"),
        ({"step_size": True}, "step_size must be a number"),
        ({"temperature": -0.5}, "temperature must be non-negative"),
        ({"temperature": math.nan}, "temperature must be non-negative"),
        ({"temperature": math.inf}, "temperature must be non-negative"),
        ({"thin": 0}, "thin must be a positive int"),
        ({"thin": -2}, "thin must be a positive int"),
        ({"thin": 1.5}, "thin must be a positive int"),
        ({"thin": True}, "thin must be a positive int"),
        ({"max_rejections": 0}, "max_rejections must be a positive int"),
        ({"subsample_size": "data"}, "subsample_size must be None, a positive int or a dict"),
        ({"subsample_size": 2.5}, "subsample_size must be None, a positive int or a dict"),
        ({"subsample_size": [10]}, "subsample_size must be None, a positive int or a dict"),
        ({"subsample_size": 0}, "subsample_size must be None, a positive int or a dict"),
        ({"subsample_size": True}, "subsample_size must be None, a positive int or a dict"),
        ({"subsample_size": {"data": 0}}, r"subsample_size\['data'\] must be a positive int"),
        ({"subsample_size": {"data": 2.5}}, r"subsample_size\['data'\] must be a positive int"),
        ({"subsample_size": {3: 10}}, "subsample_size must map plate names"),
        ({"preconditioner": "adam"}, "preconditioner must be 'identity'.*got 'adam'"),
        ({"init_strategy": "median"}, "init_strategy must be callable"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGLD(linreg, **kwargs)


def test_zero_temperature_is_allowed():
    assert SGLD(linreg, temperature=0).temperature == 0.0


def discrete_latent(x, y):
    pyro.sample("k", dist.Bernoulli(torch.tensor(0.5)))
    linreg(x, y)


def local_latent(x, y, batch=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        u = pyro.sample("u", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        pyro.sample("y", dist.Normal(x[idx] @ w + u, 1.0), obs=y[idx])


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (discrete_latent, {}, r"site 'k' is a discrete latent variable \(Bernoulli\)"),
        (local_latent, {"subsample_size": {"data": 5}}, "'u' is inside the subsampled plate"),
        (local_latent, {"subsample_size": 5}, "'u' is inside the subsampled plate 'data'"),
        (
            lambda x, y: local_latent(x, y, batch=5),
            {},
            "'u' is inside the subsampled plate 'data'",
        ),
        (linreg, {"subsample_size": {"rows": 5}}, "no such plate.*plates are \\['data'\\]"),
        (linreg, {"subsample_size": {"data": 51}}, r"\['data'\]=51 is larger than .* 50"),
    ],
    ids=[
        "discrete",
        "local-latent",
        "local-latent-int",
        "local-latent-own-plate",
        "unknown-plate",
        "batch-too-large",
    ],
)
def test_bad_models(seed, model, kwargs, match):
    x, y = _linreg_data()
    with pytest.raises(ValueError, match=match):
        SGLD(model, **kwargs).setup(0, x, y)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"v": torch.zeros(3)}, "initial_params has 'v', which is not a latent site"),
        ({"w": torch.zeros(4)}, r"initial_params\['w'\] has shape \(4,\), the site has \(3,\)"),
    ],
)
def test_bad_initial_params(seed, params, match):
    x, y = _linreg_data()
    kernel = SGLD(linreg)
    kernel.initial_params = params
    with pytest.raises(ValueError, match=match):
        kernel.setup(0, x, y)


def test_save_params_must_name_latent_sites(seed):
    x, y = _linreg_data()
    kernel = SGLD(linreg)
    kernel.save_params = ["w", "sigma"]
    with pytest.raises(ValueError, match=r"save_params names \['sigma'\], which are not latent"):
        kernel.setup(0, x, y)
    with pytest.raises(ValueError, match="save_params must be a list of site names"):
        kernel.save_params = "w"


def test_initial_params_must_be_tensors():
    with pytest.raises(ValueError, match=r"initial_params\['w'\] must be a tensor"):
        SGLD(linreg).initial_params = {"w": [0.0, 0.0, 0.0]}


class BadSchedule:
    def __init__(self, value: float, at: int) -> None:
        self.value, self.at = value, at

    def __call__(self, step: int) -> float:
        return self.value if step == self.at else 1e-3


@pytest.mark.parametrize("value", [0.0, -1e-3, math.nan])
def test_bad_schedule_value_names_the_step(seed, value):
    x, y = _linreg_data()
    kernel = SGLD(linreg, step_size=BadSchedule(value, at=4), preconditioner="identity", thin=2)
    mcmc = _mcmc(kernel, num_samples=5, warmup_steps=1)
    with pytest.raises(ValueError, match=rf"returned {value!r} at update 4; it must return"):
        mcmc.run(x, y)


# -- BNP on a PyroModule --------------------------------------------------------------------
@pytest.mark.parametrize("preconditioner", ["bnp", "bnp+rmsprop"])
def test_bnp_on_pyro_module_bnn(seed, preconditioner):
    x, y = make_bnn_data(n=40)
    net = BNN()
    kernel = SGLD(net, step_size=1e-4, preconditioner=preconditioner, subsample_size={"data": 10})
    during = []
    mcmc = _mcmc(
        kernel,
        num_samples=5,
        warmup_steps=5,
        hook_fn=lambda k, *_: during.append((_num_hooks(net), len(k.layers))),
    )
    mcmc.run(x, y)
    assert during == [(2, 2)] * 10
    assert [ref.name for ref in kernel.layers] == ["fc1", "fc2"]
    for ref in kernel.layers:
        assert ref.stats.num_batches == 11 and ref.stats.batch_size == 10
    assert _num_hooks(net) == 0
    samples = mcmc.get_samples()
    assert set(samples) == BNN_SITES and samples["fc1.weight"].shape == (5, 16, 3)
    assert all(torch.isfinite(v).all() for v in samples.values())
    assert torch.all(samples["sigma"] > 0)
    assert kernel.preconditioner.name == preconditioner


class NaiveBNN(BNN):
    """The tempting pattern: call the network inside the plate, weights first touched there."""

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=self.dtype)))
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, sigma), obs=None if y is None else y[idx])


def test_weights_first_sampled_inside_the_data_plate_are_rejected(seed):
    """Why BNN samples its weights before entering the plate (see the SGLD docstring)."""
    x, y = make_bnn_data(n=40)
    kernel = SGLD(NaiveBNN(), subsample_size={"data": 10})
    with pytest.raises(ValueError, match="'fc1.weight' is inside the subsampled plate 'data'"):
        kernel.setup(0, x, y)
    good = SGLD(BNN(), subsample_size={"data": 10})
    good.setup(0, x, y)
    assert good.initial_params["fc1.weight"].shape == (16, 3)


def test_bnp_without_layers_warns_once(seed):
    x, y = _linreg_data()
    kernel = SGLD(linreg, step_size=1e-4, preconditioner="bnp")
    with pytest.warns(UserWarning, match="found no Linear/Conv layer") as record:
        for _ in range(2):  # two chains
            kernel.setup(0, x, y)
            z = kernel.initial_params
            for _ in range(3):
                z = kernel.sample(z)
    assert len(record) == 1
    assert kernel.layers == ()


def test_kernel_pickles_mid_chain_with_hooks(seed):
    x, y = make_bnn_data(n=40)
    kernel = SGLD(BNN(), step_size=1e-4, preconditioner="bnp+rmsprop", subsample_size={"data": 10})
    kernel.setup(2, x, y)
    z = kernel.initial_params
    for _ in range(4):
        z = kernel.sample(z)
    copy = pickle.loads(pickle.dumps(kernel))
    assert _num_hooks(copy.model) == 2 and copy.model is not kernel.model
    za, zb = z, {k: v.clone() for k, v in z.items()}
    for _ in range(4):
        za, zb = kernel.sample(za), copy.sample(zb)
        assert all(torch.equal(za[k], zb[k]) for k in za)
    assert kernel.diagnostics() == copy.diagnostics()
    copy.cleanup()
    kernel.cleanup()
    assert _num_hooks(copy.model) == 0 and _num_hooks(kernel.model) == 0


def test_unpickled_kernel_restores_the_parents_thread_count(tmp_path):
    """Spawned chain workers unpickle the kernel in a fresh interpreter, which does not inherit
    ``torch.set_num_threads``: the kernel carries it (benchmarks/bench_chains.py: 4 spawned
    chains x 1000 draws took 47.2 s without, 18.1 s with)."""
    import subprocess
    import sys

    kernel = SGLD(gaussian_target, 1e-3, preconditioner="identity")
    path = tmp_path / "kernel.pkl"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        path.write_bytes(pickle.dumps(kernel))
    finally:
        torch.set_num_threads(before)
    code = (
        "import pickle, sys, torch; torch.set_num_threads(3); "
        f"pickle.loads(open({str(path)!r}, 'rb').read()); print(torch.get_num_threads())"
    )
    out = subprocess.run(  # from the tests folder: the model's module must import
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600,
        cwd=str(Path(__file__).parent),
    )  # fmt: skip
    assert out.stdout.strip() == "1"

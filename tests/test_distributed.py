"""pyro_bnp.distributed on two local gloo processes (tests/distributed_workers.py).

* Equivalence: 2 ranks x B rows == 1 process x 2B rows on the same indices, over the updates of
  a chain, for identity, RMSprop, BNP (its layer statistics too), SGHMC and sharded data. float64
  models: the only differences are the rounding of the sums (observed: below 1e-14).
* Faults: a rank that drifts apart, raises in its gradient evaluation or in its set-up stops
  every rank with a clear error; a SIGKILLed rank ends the other within seconds, and a restart
  from the store ends with exactly the uninterrupted run's draws.
* Parallel chains: 2 ranks x 1 chain -> a DataTree with 2 chains and finite R-hat.
* slow: 1000 updates of the equivalence; the conjugate-regression exact-posterior check with 2
  ranks; the example under torchrun.

Every launch is bounded by a timeout (a hang guard, generous: the machine is shared).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _run import HANG_FACTOR, HANG_MIN_S, ROOT
from distributed_workers import launch, reference_run, start, wait

from pyro_bnp.distributed import DataParallel, shard_indices, shard_range


def _limit(seconds: float) -> float:
    return max(HANG_MIN_S / 2, HANG_FACTOR * seconds)


# ------------------------------------------------------------------------------ pure parts
def test_shards_partition_the_rows():
    for n, world in [(10, 3), (240, 2), (7, 7), (5, 1)]:
        bounds = [shard_range(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_shard_indices_are_epochs_of_the_shard():
    shard, b = (40, 70), 7  # 30 rows, 4 batches per epoch, 2 rows skipped
    epoch0 = torch.cat([shard_indices(5, 1, shard, b, k) for k in range(4)])
    assert len(set(epoch0.tolist())) == 28 and epoch0.min() >= 40 and epoch0.max() < 70
    epoch1 = torch.cat([shard_indices(5, 1, shard, b, k) for k in range(4, 8)])
    assert not torch.equal(epoch0, epoch1)  # a new permutation per epoch
    assert torch.equal(shard_indices(5, 1, shard, b, 6), shard_indices(5, 1, shard, b, 6))
    assert not torch.equal(shard_indices(5, 0, shard, b, 0), shard_indices(5, 1, shard, b, 0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="data must be"):
        DataParallel(object(), data="rows")
    with pytest.raises(ValueError, match="check_every"):
        DataParallel(object(), check_every=0)
    with pytest.raises(ValueError, match="pyro_bnp kernel"):
        DataParallel(object())


# ------------------------------------------------------------------------------ equivalence
SUITE_STEPS, SUITE_DRAWS = 150, 150


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One launch of two ranks for the default tests: equivalence, faults, parallel chains."""
    out = tmp_path_factory.mktemp("suite")
    launch(2, "suite", out, SUITE_STEPS, SUITE_DRAWS, timeout=_limit(60))
    return out


def _equivalence(tmp_path: Path, steps: int, timeout: float | None) -> None:
    batch = 20
    if timeout is not None:
        launch(
            2, "equivalence", tmp_path, steps, batch, "sgld,sghmc,shard", timeout=_limit(timeout)
        )
    results = torch.load(tmp_path / "equivalence.pt")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for key, got in results.items():
            sampler, name = key.split("-")
            ref = reference_run(name, batch, 2, steps, "sgld" if sampler == "shard" else sampler)
            scale = ref["z"].abs().max().item()
            diff = (got["z"] - ref["z"]).abs().max().item()
            lp_diff = ((got["lp"] - ref["lp"]).abs() / ref["lp"].abs().clamp_min(1.0)).max()
            print(f"{key}: {steps} updates, max |z - z_ref| = {diff:.2e} (|z| up to {scale:.2f})")
            assert torch.isfinite(got["z"]).all()
            # float64 sums in another order: 1e-10 leaves room for 1e4 updates of growth
            assert diff < 1e-10 * max(scale, 1.0), key
            assert lp_diff.item() < 1e-10, key
            assert ("stats" in got) == ("stats" in ref) == (name == "bnp")
            for (m, v, n), (m_ref, v_ref, n_ref) in zip(
                got.get("stats", []), ref.get("stats", []), strict=True
            ):
                assert n == n_ref == 2 * batch  # BNP's q^2 sees the pooled batch
                torch.testing.assert_close(m, m_ref, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(default)


def test_two_ranks_equal_one_process_with_twice_the_batch(suite):
    _equivalence(suite, steps=SUITE_STEPS, timeout=None)


@pytest.mark.slow
def test_two_ranks_equal_one_process_1000_updates(tmp_path):
    _equivalence(tmp_path, steps=1000, timeout=180)


# ------------------------------------------------------------------------------ faults
def test_faults_stop_every_rank_with_a_clear_error(suite):
    seen = [json.loads((suite / f"faults-{r}.json").read_text()) for r in range(2)]
    print(json.dumps(seen, indent=1))
    for r in range(2):
        assert seen[r]["drift"].startswith("DriftError"), seen[r]
        assert "no longer hold the same state at draw 10" in seen[r]["drift"]
    assert seen[1]["error"] == "ZeroDivisionError: a bug in rank 1's model"
    assert seen[0]["error"].startswith("RankFailure") and "rank(s) [1]" in seen[0]["error"]
    assert seen[1]["setup"].startswith("ValueError") and "NaN" in seen[1]["setup"]
    assert seen[0]["setup"].startswith("RankFailure") and "rank(s) [1]" in seen[0]["setup"]


def _draws(directory: Path) -> dict[str, np.ndarray]:
    from pyro_bnp.store import load_store

    tree = load_store(directory)
    return {str(k): v.values for k, v in tree.posterior.data_vars.items()}


def _kill_and_resume(tmp_path: Path, num_samples: int, compare: bool) -> None:
    store = tmp_path / "store"
    procs = start(2, "store", store, num_samples)
    deadline = time.monotonic() + _limit(60)
    while len(list(store.glob("part-*.nc")) if store.exists() else []) < 2:
        assert time.monotonic() < deadline, "the run did not write its first parts"
        assert all(p.poll() is None for p in procs), wait(procs, 10)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    (rc0, _, err0), _ = wait(procs, _limit(30))
    noticed = time.monotonic() - killed
    print(f"rank 0 stopped {noticed:.2f} s after rank 1 was killed")
    assert rc0 != 0
    assert "RankFailure" in err0 and "another rank died" in err0, err0[-3000:]
    assert "resumed from its last checkpoint" in err0
    assert noticed < 30.0  # gloo notices a closed socket at once (measured: about 1-2 s)
    launch(2, "store", store, num_samples, timeout=_limit(60))
    draws = _draws(store)
    assert all(v.shape[1] == num_samples for v in draws.values())
    assert all(np.isfinite(v).all() for v in draws.values())
    if compare:
        clean = tmp_path / "clean"
        launch(2, "store", clean, num_samples, timeout=_limit(60))
        expected = _draws(clean)
        assert draws.keys() == expected.keys()
        for k, v in expected.items():
            np.testing.assert_array_equal(draws[k], v, err_msg=k)  # nothing lost or changed


def test_killed_rank_ends_the_other_and_the_run_resumes(tmp_path):
    _kill_and_resume(tmp_path, num_samples=60, compare=False)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    _kill_and_resume(tmp_path, num_samples=200, compare=True)


# ------------------------------------------------------------------------------ parallel chains
def _chains(tmp_path: Path, store: str, draws: int, run: bool = True) -> None:
    import arviz_stats
    import xarray as xr

    if run:
        launch(2, "chains", tmp_path, draws, store, timeout=_limit(60))
    tree = xr.open_datatree(tmp_path / "chains.nc")
    post = tree["posterior"].to_dataset()
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == draws
    assert tree["log_likelihood"].to_dataset().sizes["chain"] == 2
    assert not np.array_equal(post["b"].values[0], post["b"].values[1])  # different seeds
    rhat = arviz_stats.rhat(post)
    values = np.concatenate([np.ravel(rhat[k].values) for k in rhat.data_vars])
    print("R-hat", values.round(3))
    assert np.isfinite(values).all()
    if store == "store":
        assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["chain-0", "chain-1"]


def test_parallel_chains_give_a_datatree_with_one_chain_per_rank(suite):
    _chains(suite, "mcmc", SUITE_DRAWS, run=False)


@pytest.mark.slow
def test_parallel_chains_streamed_per_rank(tmp_path):
    _chains(tmp_path, "store", 300)


# ------------------------------------------------------------------------------ slow checks
@pytest.mark.slow
def test_conjugate_regression_exact_posterior_with_two_ranks(tmp_path):
    from sgld_models import badly_scaled_features
    from test_exact_posteriors import _conjugate_check

    launch(2, "posterior", tmp_path, 30000, 1000, timeout=_limit(400))
    draws = torch.load(tmp_path / "posterior.pt")
    x, y = badly_scaled_features(2000, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    # two ranks x 50 rows: the one-process check's batch of 100 rows
    _conjugate_check(draws, x, y, 10.0, 1.0, 2e-5, 100)


@pytest.mark.slow
def test_example_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = Path(shutil.which("torchrun") or "torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--master_port",
        str(__import__("distributed_workers").free_port()),
        str(ROOT / "examples" / "distributed.py"),
        "--quick",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_limit(120), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import xarray as xr

    for name in ("data_parallel.nc", "chains.nc"):
        tree = xr.open_datatree(tmp_path / name)
        post = tree["posterior"].to_dataset()
        assert all(np.isfinite(v.values).all() for v in post.data_vars.values())
    assert xr.open_datatree(tmp_path / "chains.nc")["posterior"].sizes["chain"] == 2
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())["max_rhat"])

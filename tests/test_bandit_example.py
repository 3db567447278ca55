"""The contextual bandit example: reward / regret definitions, and a quick end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _run import METHODS, ROOT, load_example, run_example

DATA_DIR = ROOT.parent / "shared" / "data"
POLICIES = {"uniform", "greedy", *METHODS, "sghmc", "bnp-sghmc"}  # SGHMC: issue 15

bp = load_example("_bandit_problems")


def test_mushroom_rewards_and_regret():
    poisonous = np.array([False, True, True, False])
    means = bp.mushroom_means(poisonous)
    np.testing.assert_array_equal(means, [[0, 5], [0, -15], [0, -15], [0, 5]])
    optimal = (~poisonous).astype(int)  # eat iff edible
    np.testing.assert_array_equal(bp.regret(means, optimal), 0.0)
    # always eat: 15 per poisonous mushroom; never eat: 5 per edible one
    np.testing.assert_array_equal(bp.regret(means, np.ones(4, int)), [0, 15, 15, 0])
    np.testing.assert_array_equal(bp.regret(means, np.zeros(4, int)), [5, 0, 0, 5])


def test_mushroom_realised_rewards():
    x = np.eye(4, dtype=np.float32)
    poisonous = np.array([False, True, False, True])
    rounds = bp.mushroom_rounds(x, poisonous, 20_000, np.random.default_rng(0))
    pois = rounds.means[:, 1] < 0
    np.testing.assert_array_equal(rounds.rewards[:, 0], 0.0)
    np.testing.assert_array_equal(rounds.rewards[~pois, 1], 5.0)
    eat_pois = rounds.rewards[pois, 1]
    assert set(np.unique(eat_pois)) == {5.0, -35.0}
    assert abs(eat_pois.mean() - (-15.0)) < 0.6  # sd of the mean ~ 0.2
    # a context's label decides its rewards
    labels = poisonous[np.argmax(rounds.contexts, axis=1)]
    np.testing.assert_array_equal(labels, pois)


@pytest.mark.parametrize("delta", [0.5, 0.95])
def test_wheel_rewards_and_regret(delta):
    rng = np.random.default_rng(1)
    rounds = bp.wheel_rounds(40_000, delta, rng)
    ctx = rounds.contexts.astype(float)
    radius = np.linalg.norm(ctx, axis=1)
    assert radius.max() <= 1.0
    # uniform in the disc: P(r <= delta) = delta^2, quadrants equally likely
    assert abs((radius <= delta).mean() - delta**2) < 0.01
    assert abs((ctx[:, 0] >= 0).mean() - 0.5) < 0.01
    outside = radius > delta
    np.testing.assert_array_equal(rounds.means[:, 0], 1.2)
    np.testing.assert_array_equal(rounds.means[~outside, 1:], 1.0)
    assert np.all((rounds.means[outside, 1:] == 50.0).sum(axis=1) == 1)
    assert np.all((rounds.means[outside, 1:] == 1.0).sum(axis=1) == 3)
    # the quadrant decides which action pays 50
    best = rounds.means.argmax(axis=1)
    q = 1 + 2 * (ctx[:, 0] < 0) + (ctx[:, 1] < 0)
    np.testing.assert_array_equal(best[outside], q[outside])
    np.testing.assert_array_equal(best[~outside], 0)
    assert np.abs(rounds.rewards - rounds.means).std() < 0.011
    # optimal policy: no regret; action 0 always: 48.8 outside, 0 inside
    np.testing.assert_array_equal(bp.regret(rounds.means, best), 0.0)
    reg0 = bp.regret(rounds.means, np.zeros(len(best), int))
    np.testing.assert_allclose(reg0, np.where(outside, 48.8, 0.0))
    # any other action inside the disc: 0.2
    np.testing.assert_allclose(bp.regret(rounds.means, np.ones(len(best), int))[~outside], 0.2)


def test_quick_run(tmp_path):
    if not (DATA_DIR / "mushroom" / "agaricus.txt.train").exists():
        pytest.skip(f"mushroom data not found at {DATA_DIR}/mushroom (the shared data directory)")
    proc = run_example("bandit", "--quick", "--out", tmp_path, "--data-dir", DATA_DIR, timeout=300)
    out = json.loads((tmp_path / "results.json").read_text())
    n = out["config"]["rounds"]
    assert set(out["results"]) == {"mushroom", "wheel"}
    for problem, res in out["results"].items():
        assert set(res) == POLICIES, problem
        for policy, s in res.items():
            curve = s["cum_regret_mean"]
            assert len(curve) == n, (problem, policy)
            assert all(math.isfinite(v) for v in curve), (problem, policy)
            assert all(b >= a for a, b in zip(curve, curve[1:], strict=False))  # regret >= 0
    png = tmp_path / "bandit_regret.png"
    assert png.exists() and png.stat().st_size > 5_000
    assert "bnp+rmsprop" in proc.stdout


def test_extra_policy_runs_only_when_named(tmp_path):
    """``--policies bnp-cap`` runs BNP with the prior cap (on the wheel: no data files needed)."""
    args = ("--quick", "--problem", "wheel", "--policies", "bnp-cap", "--out", tmp_path)
    run_example("bandit", *args, timeout=300)
    out = json.loads((tmp_path / "results.json").read_text())
    (res,) = out["results"].values()
    assert set(res) == {"bnp-cap"}
    assert all(math.isfinite(v) for v in res["bnp-cap"]["cum_regret_mean"])

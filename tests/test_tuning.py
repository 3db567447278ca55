"""stein_discrepancy on a conjugate model with a known score; tune_step_size on a small problem."""

from __future__ import annotations

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from _run import run_example
from pyro.infer import MCMC

import pyro_bnp
from pyro_bnp.diagnostics import ksd
from pyro_bnp.tuning import DEFAULT_STEP_SIZES, stein_discrepancy, tune_step_size

N = 100
PRIOR_SD = 10.0
LAM = N + 1 / PRIOR_SD**2  # posterior precision of each theta_j


def make_data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.5 + torch.randn(N, 2, generator=g)


def model(y, cut=None):
    """theta ~ N(0, 10^2 I_2), y_i ~ N(theta, I_2); tau ~ HalfNormal(1) is not in the likelihood."""
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    theta = pyro.sample("theta", dist.Normal(0.0, PRIOR_SD).expand([2]).to_event(1))
    if cut is not None:  # log density -inf... NaN beyond theta_0 > cut: those updates are rejected
        pyro.factor("cut", torch.where(theta[0] > cut, torch.tensor(math.nan), torch.tensor(0.0)))
    with pyro.plate("data", y.shape[0]) as idx:
        pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y[idx])
    return tau


def exact_draws(y: torch.Tensor, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = y.sum(0) / LAM
    return {
        "theta": mean + torch.randn(n, 2, generator=g) / math.sqrt(LAM),
        "tau": torch.randn(n, generator=g).abs(),
    }


def analytic(y: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconstrained draws [log tau, theta] (sorted site names) and their exact scores.

    theta: y.sum(0) - LAM theta. u = log tau: log p(u) = -exp(2u) / 2 + u + const (the
    HalfNormal density at exp(u) times the Jacobian exp(u)), score 1 - exp(2u).
    """
    u = draws["tau"].double().log()
    theta = draws["theta"].double()
    flat = torch.cat([u[:, None], theta], dim=1)
    scores = torch.cat([(1 - torch.exp(2 * u))[:, None], y.double().sum(0) - LAM * theta], dim=1)
    return flat, scores


# --------------------------------------------------------------------------- the wrapper
def test_wrapper_matches_ksd_with_the_analytic_score():
    y = make_data()
    draws = exact_draws(y, 400, seed=1)
    flat, scores = analytic(y, draws)
    expected = ksd(flat, scores)
    result = stein_discrepancy(draws, model, (y,), return_scores=True)
    assert result.sites == (("tau", ()), ("theta", (2,)))
    torch.testing.assert_close(result.draws, flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.scores, scores, rtol=1e-5, atol=1e-4)  # float32 model
    assert result.ksd == pytest.approx(expected, rel=1e-5)
    assert stein_discrepancy(draws, model, (y,)) == result.ksd  # the float alone
    # (chain, draw, ...) arrays of two chains give the same pool
    chained = {k: v.reshape(2, 200, *v.shape[1:]).numpy() for k, v in draws.items()}
    assert stein_discrepancy(chained, model, (y,)) == pytest.approx(result.ksd, rel=1e-12)
    # thin and max_draws select rows as documented
    thinned = stein_discrepancy(draws, model, (y,), thin=4, return_scores=True)
    torch.testing.assert_close(thinned.draws, flat[::4], rtol=1e-6, atol=1e-6)
    capped = stein_discrepancy(draws, model, (y,), max_draws=100, return_scores=True)
    keep = torch.linspace(0, 399, 100).round().long()  # evenly spaced over the pool
    torch.testing.assert_close(capped.draws, flat[keep], rtol=1e-6, atol=1e-6)
    assert capped.ksd == pytest.approx(ksd(flat[keep], scores[keep]), rel=1e-5)


def test_exact_draws_beat_biased_ones():
    y = make_data()
    draws = exact_draws(y, 400, seed=2)
    exact = stein_discrepancy(draws, model, (y,))
    wide = {**draws, "theta": draws["theta"].mean(0) + 2.0 * (draws["theta"] - y.sum(0) / LAM)}
    prior_tau = {**draws, "tau": 3.0 * draws["tau"]}  # the tau site's distribution is wrong
    assert stein_discrepancy(wide, model, (y,)) > 2 * exact
    assert stein_discrepancy(prior_tau, model, (y,)) > 2 * exact


def test_sources_mcmc_datatree_and_dict_agree():
    y = make_data()
    pyro.set_rng_seed(3)
    kernel = pyro_bnp.SGLD(model, 1e-3, subsample_size={"data": 20}, preconditioner="identity")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "num_chains=2 is more than available_cpu")
        mcmc = MCMC(kernel, num_samples=100, warmup_steps=50, num_chains=2, disable_progbar=True)
    mcmc.run(y)
    from_mcmc = stein_discrepancy(mcmc, model, (y,), return_scores=True)
    from_tree = stein_discrepancy(pyro_bnp.from_pyro(mcmc), model, (y,))
    from_dict = stein_discrepancy(mcmc.get_samples(), model, (y,))
    assert from_mcmc.draws.shape == (200, 3)
    assert from_tree == from_mcmc.ksd == from_dict
    flat, scores = analytic(y, mcmc.get_samples())
    assert from_mcmc.ksd == pytest.approx(ksd(flat, scores), rel=1e-5)


def test_large_batch_scores():
    y = make_data()
    draws = exact_draws(y, 200, seed=4)
    full = stein_discrepancy(draws, model, (y,), return_scores=True)
    # a batch of all N rows (in shuffled order) is the full-data score
    whole = stein_discrepancy(draws, model, (y,), batch_size={"data": N}, return_scores=True)
    torch.testing.assert_close(whole.scores, full.scores, rtol=1e-5, atol=1e-4)
    # small batches: noisy scores inflate KSD^2. With independent batches the expected increase
    # is mean |noise|^2 / n (c = 1); the consecutive slices of shuffled epochs used here have
    # negatively correlated noise (an epoch's noise sums to zero) and inflate it less (2.2 vs 8.3)
    small = stein_discrepancy(draws, model, (y,), batch_size={"data": 10}, return_scores=True)
    bound = float(((small.scores - full.scores) ** 2).sum(1).mean() / 200)
    assert 0.0 < small.ksd**2 - full.ksd**2 < bound


def test_wrapper_errors():
    y = make_data()
    draws = exact_draws(y, 20, seed=0)
    with pytest.raises(ValueError, match="lack the latent site"):
        stein_discrepancy({"theta": draws["theta"]}, model, (y,))
    with pytest.raises(ValueError, match="have shape"):
        stein_discrepancy({**draws, "theta": draws["theta"][:, :1]}, model, (y,))
    with pytest.raises(ValueError, match="source must be"):
        stein_discrepancy([1, 2, 3], model, (y,))
    with pytest.raises(ValueError, match="max_draws"):
        stein_discrepancy(draws, model, (y,), max_draws=0)


def test_non_finite_draw_gives_inf():
    y = make_data()
    draws = exact_draws(y, 20, seed=0)
    draws["tau"][3] = math.inf  # a scale that ran away to overflow
    assert stein_discrepancy(draws, model, (y,)) == math.inf


# --------------------------------------------------------------------------- the tuner
GRID = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)


def sgld(eps: float) -> pyro_bnp.SGLD:
    return pyro_bnp.SGLD(model, eps, subsample_size={"data": 20}, preconditioner="identity")


def test_tuner_picks_a_middle_step_size_and_marks_exploding_runs():
    """Full-data curvature LAM = 100: SGLD is unstable beyond eps = 4 / LAM = 0.04.

    At eps = 0.03 the chain's variance is about 4 times the posterior's (1 / (1 - eps LAM / 4)),
    at 1e-6 it has not left the initial point after 500 updates (eps LAM / 2 = 5e-5 per update).
    """
    y = make_data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = tune_step_size(sgld, (y,), step_sizes=GRID, num_samples=300, warmup_steps=200,
                            progress=False)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is restored
    table = {row["step_size"]: row for row in result.table}
    assert list(table) == list(GRID)
    assert 1e-4 < result.step_size < 3e-2
    assert result.ksd == table[result.step_size]["ksd"] == min(r["ksd"] for r in result.table)
    for eps in (1e-1, 1.0):
        assert table[eps]["ksd"] == math.inf
        assert table[eps]["status"].startswith("failed: RuntimeError")
        assert "exploding" in table[eps]["status"]
    assert table[3e-2]["status"] == "ok" and table[3e-2]["ksd"] > 2 * result.ksd  # biased
    assert table[1e-6]["ksd"] > 10 * result.ksd  # stuck near the initial point
    assert all(table[e]["draws"] == 300 for e in GRID[:7])
    text = str(result)
    assert "chosen step size" in text and "exploding" in text
    assert sum(line.startswith("*") for line in text.splitlines()) == 1


def test_tuner_divergent_runs_score_inf_and_warnings_are_recorded():
    y = make_data()
    cut = float(y[:, 0].sum() / LAM) + 0.1  # one posterior sd above the mean of theta_0
    result = tune_step_size(
        lambda eps: pyro_bnp.SGLD(
            model, eps, subsample_size={"data": 20}, preconditioner="bnp+rmsprop"
        ),
        (y,),
        model_kwargs={"cut": cut},
        step_sizes=(1e-3, 1e-2),
        num_samples=200,
        warmup_steps=100,
        max_divergence_fraction=0.05,
        record=lambda mcmc: {"theta0_max": float(mcmc.get_samples()["theta"][:, 0].max())},
        progress=False,
    )
    big = result.table[1]
    assert big["status"].startswith("divergent") and big["ksd"] == math.inf
    assert big["divergences"] > 10
    assert result.step_size == 1e-3
    assert all(row["theta0_max"] <= cut for row in result.table)
    # BNP on a model without network layers says it acts as RMSprop: recorded, not raised
    assert any("acts as RMSprop" in w for w in result.table[0]["warnings"])


def test_tuner_runs_sghmc():
    y = make_data()
    result = tune_step_size(
        lambda h: pyro_bnp.SGHMC(
            model, h, friction=10.0, subsample_size={"data": 20}, preconditioner="rmsprop"
        ),
        (y,),
        step_sizes=(1e-3, 1e-2, 10.0),
        num_samples=100,
        warmup_steps=50,
        ksd_draws=50,
        progress=False,
    )
    assert [r["draws"] for r in result.table[:2]] == [50, 50]
    assert result.table[2]["status"].startswith("failed")  # h alpha = 100 > 1: rejected
    assert result.step_size in (1e-3, 1e-2)


def test_tuner_all_failed_and_bad_arguments():
    y = make_data()
    result = tune_step_size(sgld, (y,), step_sizes=(1.0,), num_samples=10, warmup_steps=5,
                            progress=False)  # fmt: skip
    assert math.isnan(result.step_size) and result.ksd == math.inf
    with pytest.raises(ValueError, match="empty"):
        tune_step_size(sgld, (y,), step_sizes=())
    with pytest.raises(ValueError, match="positive"):
        tune_step_size(sgld, (y,), step_sizes=(1e-3, -1.0))
    with pytest.raises(ValueError, match="num_samples"):
        tune_step_size(sgld, (y,), num_samples=0)


def test_default_grid_is_log_spaced():
    grid = torch.tensor(DEFAULT_STEP_SIZES, dtype=torch.float64)
    assert grid[0] == pytest.approx(1e-7) and grid[-1] == pytest.approx(1e-1)
    ratios = grid[1:] / grid[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, math.sqrt(10.0)))


# --------------------------------------------------------------------------- the example
def test_diabetes_example_quick(tmp_path):
    run_example("diabetes_tuning", "--quick", "--out", tmp_path, timeout=150)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "diabetes_tuning.png").stat().st_size > 10_000
    assert math.isfinite(results["nuts"]["ksd"])
    for name, method in results["methods"].items():
        assert method["tuning"], name
        if method.get("skipped"):
            continue
        assert math.isfinite(method["step_size"]) and math.isfinite(method["ksd"]), name
        runs = [method] + ([method["smaller"]] if "smaller" in method else [])
        for run in runs:  # the chosen step size and the next smaller one of the grid
            assert math.isfinite(run["ksd"])
            for site in run["sites"]:
                assert math.isfinite(site["mean_error_sd"]) and math.isfinite(site["sd_ratio"])
    assert any("smaller" in m for m in results["methods"].values())

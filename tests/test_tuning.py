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
from pyro_bnp.tuning import (
    DEFAULT_STEP_SIZES,
    _choose,
    _standardized,
    stein_discrepancy,
    tune_step_size,
)

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


# --------------------------------------------------------------------------- standardising
def _gaussian_draws(spread: tuple[float, float], n: int = 500) -> tuple[torch.Tensor, ...]:
    """Draws of N(0, diag(1, 0.03^2)) with each coordinate's spread scaled; exact scores."""
    sd = torch.tensor([1.0, 0.03], dtype=torch.float64)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z * sd * torch.tensor(spread, dtype=torch.float64)
    return x, -x / sd**2


def test_standardized_ksd_is_scale_invariant_and_keeps_frozen_columns():
    x, s = _gaussian_draws((1.0, 1.0))
    a = torch.tensor([7.0, 0.01], dtype=torch.float64)  # x -> a x: the score becomes s / a
    assert ksd(*_standardized(x * a, s / a)) == pytest.approx(ksd(*_standardized(x, s)), 1e-10)
    assert ksd(x * a, s / a) != pytest.approx(ksd(x, s), rel=0.1)  # the unscaled KSD is not
    z, t = _standardized(x, s)
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(z * t, x * s)  # x_j s_j is unchanged
    frozen = x.clone()
    frozen[:, 1] = 0.5  # a coordinate that did not move keeps scale 1
    z, t = _standardized(frozen, s)
    assert torch.equal(z[:, 1], frozen[:, 1]) and torch.equal(t[:, 1], s[:, 1])
    one = _standardized(x[:1], s[:1])  # a single draw: no sd, nothing rescaled
    assert torch.equal(one[0], x[:1]) and torch.equal(one[1], s[:1])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        _standardized(x, s[:, :1])


def test_standardized_ksd_sees_the_spread_of_a_wide_coordinate():
    """The unscaled KSD is dominated by the narrow coordinate's scores (tr(S^-1) / n)."""
    exact = _gaussian_draws((1.0, 1.0))
    wide = _gaussian_draws((1.3, 1.0))  # the sd-1 coordinate 1.3 times too wide
    assert ksd(*wide) / ksd(*exact) < 1.05  # measured: 1.232 / 1.238
    assert ksd(*_standardized(*wide)) / ksd(*_standardized(*exact)) > 2.0  # 0.21 / 0.070
    narrow = _gaussian_draws((1.0, 1.3))  # the narrow one too wide: both see it
    assert ksd(*narrow) / ksd(*exact) > 1.2
    assert ksd(*_standardized(*narrow)) / ksd(*_standardized(*exact)) > 2.0


def test_choice_on_a_constructed_table():
    """The smallest score among the runs within max_unscaled_ratio of the smallest unscaled KSD."""

    def table() -> list[dict]:
        rows = [  # step, score (standardised), unscaled, status: the diabetes pattern
            (1e-7, 0.60, 970.0, "ok"),  # frozen near the initial point: a low bounded score
            (1e-5, 5.30, 104.0, "ok"),
            (1e-4, 0.79, 18.1, "ok"),
            (3e-4, 0.91, 14.4, "ok"),  # the smallest unscaled KSD
            (1e-3, 4.20, 36.2, "ok"),
            (1e-2, math.inf, math.inf, "failed: RuntimeError: exploding"),
        ]
        return [{"step_size": e, "ksd": k, "ksd_unscaled": u, "status": st} for e, k, u, st in rows]

    rows = table()
    assert _choose(rows, 10.0)["step_size"] == 1e-4
    assert [r["candidate"] for r in rows] == [False, True, True, True, True, False]  # 104 < 144
    assert _choose(table(), math.inf)["step_size"] == 1e-7  # without the guard: the frozen run
    assert _choose(table(), 1.0)["step_size"] == 3e-4  # only the smallest unscaled KSD
    zero = table()
    zero[4]["ksd_unscaled"] = 0.0  # a zero floor: only it is within any finite ratio
    assert _choose(zero, 10.0)["step_size"] == 1e-3
    assert _choose(zero, math.inf)["step_size"] == 1e-7
    tie = table()
    tie[2]["ksd"] = tie[3]["ksd"]
    assert _choose(tie, 10.0)["step_size"] == 3e-4  # ties: the larger step size
    failed = table()
    for r in failed:
        r["status"] = "failed: x"
    assert _choose(failed, 10.0) is None and not any(r["candidate"] for r in failed)
    y = make_data()
    with pytest.raises(ValueError, match="max_unscaled_ratio"):
        tune_step_size(sgld, (y,), max_unscaled_ratio=0.5)


# a conjugate regression (normal-inverse-gamma prior): the posterior is known in closed form
A0, B0 = 2.0, 1.0


def nig_data(n: int = 200, d: int = 3, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = z.clone()
    for j in range(1, d):  # correlated inputs, AR(1) with rho = 0.7
        x[:, j] = 0.7 * x[:, j - 1] + math.sqrt(1 - 0.49) * z[:, j]
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return x.float(), y.float()


def nig_model(x, y):
    """sigma2 ~ InvGamma(A0, B0), w | sigma2 ~ N(0, sigma2 I), y ~ N(x w, sigma2)."""
    s2 = pyro.sample("sigma2", dist.InverseGamma(A0, B0))
    w = pyro.sample("w", dist.Normal(0.0, s2.sqrt()).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, s2.sqrt()), obs=y[idx])


def nig_posterior(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and sds of ``[w_0, ..., w_{d-1}, sigma2]``: w is Student-t, sigma2 IG."""
    x, y = x.double(), y.double()
    prec = torch.eye(x.shape[1], dtype=torch.float64) + x.T @ x
    cov = torch.linalg.inv(prec)
    m = cov @ x.T @ y
    an = A0 + x.shape[0] / 2
    bn = B0 + 0.5 * float(y @ y - m @ prec @ m)
    mean = torch.cat([m, torch.tensor([bn / (an - 1)], dtype=torch.float64)])
    sd2 = torch.tensor([bn / ((an - 1) * math.sqrt(an - 2))], dtype=torch.float64)
    return mean, torch.cat([(bn / (an - 1) * cov.diagonal()).sqrt(), sd2])


def test_tuner_pick_meets_the_criterion_on_a_conjugate_regression():
    """N = 200, batch 20: the unscaled rule picks 1e-3, where sigma2 is 0.6 sd too high.

    Measured over the grid 3.16e-6 ... 3.16e-3 (2000 draws, thin 2, after 500 warmup; seed 1):
    |mean error| / sd of sigma2 0.17, 0.02, 0.13, 0.60 at 3.16e-5, 1e-4, 3.16e-4, 1e-3; the
    sd ratios of w 0.78-0.87, 0.90-0.96, 1.00-1.04, 1.28-1.41. The standardised KSD picks
    3.16e-4, where every site is within 0.5 sd in mean and a factor 1.5 in sd.
    """
    x, y = nig_data()

    def make(eps: float, thin: int = 1) -> pyro_bnp.SGLD:
        return pyro_bnp.SGLD(
            nig_model, eps, subsample_size={"data": 20}, preconditioner="identity", thin=thin
        )

    kw = {"num_samples": 400, "warmup_steps": 200, "ksd_draws": 200, "progress": False}
    new = tune_step_size(make, (x, y), step_sizes=(1e-4, 10**-3.5, 1e-3, 10**-2.5), **kw)
    assert new.ksd == min(r["ksd"] for r in new.table)
    assert "unscaled" in str(new).splitlines()[0]
    old = min(new.table, key=lambda r: r["ksd_unscaled"])  # the rule of standardize=False
    assert old["step_size"] == pytest.approx(1e-3) and new.step_size < old["step_size"]
    unscaled = tune_step_size(make, (x, y), step_sizes=(1e-3,), standardize=False, **kw)
    assert unscaled.ksd == unscaled.table[0]["ksd_unscaled"]
    assert unscaled.ksd == pytest.approx(old["ksd_unscaled"], rel=1e-9)  # the same run
    assert old["ksd"] != pytest.approx(old["ksd_unscaled"], rel=1e-3)
    pyro.set_rng_seed(1)
    mcmc = MCMC(make(new.step_size, thin=2), num_samples=1500, warmup_steps=300,
                disable_progbar=True)  # fmt: skip
    mcmc.run(x, y)
    draws = mcmc.get_samples()
    flat = torch.cat([draws["w"].double(), draws["sigma2"].double()[:, None]], dim=1)
    mean, sd = nig_posterior(x, y)
    assert ((flat.mean(0) - mean).abs() / sd).max() < 0.5
    ratio = flat.std(0) / sd
    assert ratio.min() > 1 / 1.5 and ratio.max() < 1.5


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
        old = method["unscaled_pick"]  # the step size of the smallest unscaled KSD
        rows = [r for r in method["tuning"] if r["ksd_unscaled"] is not None]
        assert old["step_size"] == min(rows, key=lambda r: r["ksd_unscaled"])["step_size"]
        runs = [method] + ([old] if "sites" in old else [])
        for run in runs:  # the chosen step size and the unscaled rule's, if different
            assert math.isfinite(run["ksd"]) and math.isfinite(run["ksd_standardized"])
            for site in run["sites"]:
                assert math.isfinite(site["mean_error_sd"]) and math.isfinite(site["sd_ratio"])

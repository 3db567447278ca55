"""The eight silent failures reported by a new user (docs/usage.md, "Faults and bad input"):
each now ends in a correct result or in an error/warning that names the site and the cause."""

from __future__ import annotations

import math
import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from sgld_models import linreg, make_linreg_data
from torch import nn

from pyro_bnp import SGLD, Health


# -- case 5: bad data that slipped through ---------------------------------------------------
def test_inf_in_observations_is_refused_before_sampling():
    x, y = make_linreg_data(50)
    y[7] = float("inf")
    kernel = SGLD(linreg, 1e-3, preconditioner="identity")
    with pytest.raises(
        ValueError, match=r"the data contain inf: .*'y' \(shape \(50,\)\) at index \(7,\)"
    ):
        kernel.setup(0, x, y)


def test_nan_in_a_closed_over_tensor_is_refused_before_sampling():
    x, y = make_linreg_data(50)
    x[4, 2] = float("nan")

    def model(y):  # x is not an argument: the model closes over it
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w, 0.5), obs=y[idx])

    kernel = SGLD(model, 1e-3, preconditioner="identity", subsample_size={"data": 10})
    with pytest.raises(
        ValueError,
        match=r"NaN: variable the model closes over 'x' \(shape \(50, 3\)\) at index \(4, 2\)",
    ):
        kernel.setup(0, y)


class HiddenData:
    """A model object that keeps its data where no set-up check can see them."""

    def __init__(self, x, y):
        self.store = {"x": x, "y": y}

    def __call__(self):
        x, y = self.store["x"], self.store["y"]
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w, 0.5), obs=y[idx])


def test_inf_in_data_reached_only_at_run_time_is_named_at_the_first_bad_batch(seed):
    x, y = make_linreg_data(200)
    y[123] = float("inf")
    kernel = SGLD(HiddenData(x, y), 1e-4, preconditioner="identity", subsample_size={"data": 20})
    mcmc = MCMC(kernel, num_samples=30, warmup_steps=0, disable_progbar=True)
    with pytest.raises(ValueError, match=r"site 'y' at row 123 of plate 'data'.*remove or impute"):
        mcmc.run()


# -- case 2: a chain that freezes (RMSprop's V overflowed: M = 0) ----------------------------
def overflowing(y):
    # a log density term with a huge but finite gradient: its square overflows float32, so
    # RMSprop's V is inf and M = 1 / (eps + sqrt(V)) = 0 for theta (the user's matrix
    # factorisation: sigma's V became inf and sigma stayed at 7.6e12 for every draw)
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.factor("huge", 1e21 * theta.sum())
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_frozen_site_and_broken_preconditioner_state_are_named(seed):
    y = torch.randn(20)
    kernel = SGLD(overflowing, 1e-3, preconditioner="rmsprop", health=Health(every=20))
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=0, disable_progbar=True)
    with pytest.warns(RuntimeWarning) as caught:
        mcmc.run(y)
    messages = [str(w.message) for w in caught]
    assert any("site 'theta'" in m and "second moment V is not finite" in m for m in messages)
    assert any(
        "site 'theta'" in m and "has not changed in the last 20 draws" in m for m in messages
    )
    assert not any("site 'mu'" in m for m in messages)  # the healthy site is not blamed
    events = kernel.diagnostics()["health"]
    assert {(e["site"], e["check"]) for e in events} >= {
        ("theta", "preconditioner"),
        ("theta", "frozen"),
    }
    # and the export keeps them
    from pyro_bnp import from_pyro

    dt = from_pyro(mcmc, log_likelihood=False)
    assert "frozen" in dt["sample_stats"].attrs["pyro_diagnostics"]


def test_healthy_chain_raises_no_health_warning(seed):
    y = torch.randn(20)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, s), obs=y)

    kernel = SGLD(model, 1e-3, preconditioner="rmsprop", health=Health(every=20))
    MCMC(kernel, num_samples=200, warmup_steps=50, disable_progbar=True).run(y)  # warnings: errors
    assert kernel.diagnostics()["health"] == []


# -- case 3: the default preconditioner lets a scalar site outside the layers run away --------
class TemperedDigits(PyroModule):
    """64-32-10 BNN on scikit-learn's digits, logits divided by a LogNormal(0, 1) temperature."""

    def __init__(self, temperature: bool = True) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](64, 32)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([32, 64]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([32]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](32, 10)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([10, 32]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([10]).to_event(1))
        self.tempered = temperature

    def forward(self, x, y=None):
        for layer in (self.fc1, self.fc2):
            _ = layer.weight, layer.bias
        temp = pyro.sample("temperature", dist.LogNormal(0.0, 1.0)) if self.tempered else 1.0
        with pyro.plate("data", x.shape[0]) as idx:
            logits = self.fc2(torch.tanh(self.fc1(x[idx]))) / temp
            pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def _digits():
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    return torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)


def test_runaway_temperature_under_plain_bnp_is_named_with_the_fix(seed):
    """Measured: at step size 3e-3 plain BNP sends the temperature to ~5e4 (two seeds); the
    check names it after 50 draws and points to BNP(others='rmsprop')."""
    x, y = _digits()
    kernel = SGLD(TemperedDigits(), 3e-3, subsample_size={"data": 64}, health=Health(every=50))
    with pytest.warns(RuntimeWarning, match=r"site 'temperature'.*prior standard deviations.*"
                      r"BNP\(others='rmsprop'\)"):  # fmt: skip
        MCMC(kernel, num_samples=100, warmup_steps=50, disable_progbar=True).run(x, y)
    (event,) = [e for e in kernel.diagnostics()["health"] if e["check"] == "runaway"][:1]
    assert event["site"] == "temperature"


# -- case 4: LOO of an exported SGLD run is finite ---------------------------------------------
def test_loo_of_an_exported_digits_bnn_is_finite(seed):
    azs = pytest.importorskip("arviz_stats")
    from pyro_bnp import from_pyro

    x, y = _digits()
    kernel = SGLD(
        TemperedDigits(temperature=False), 1e-4, subsample_size={"data": 64},
        preconditioner="bnp+rmsprop", thin=5,
    )  # fmt: skip
    mcmc = MCMC(kernel, num_samples=60, warmup_steps=60, disable_progbar=True)
    mcmc.run(x, y)
    dt = from_pyro(mcmc)
    assert dt["log_likelihood"]["obs"].dtype == "float64"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto k warnings of a short run
        loo = azs.loo(dt)
    assert math.isfinite(float(loo.elpd)) and float(loo.elpd) < 0


# -- issue 14: RMSprop sends a scale site away on the diabetes regression ----------------------
def test_rmsprop_runaway_of_sigma_on_diabetes_is_named():
    """Measured: pSGLD at 1e-2 with batch 32 sends the noise scale ``sigma`` (NUTS: 0.70 +- 0.02)
    to 1e3-1e6 with no rejected update (seed 0; with other seeds ``w`` runs away first, or
    ``sigma`` collapses and the log density drops: those are named too); the health check names
    ``sigma`` and RMSprop's cause."""
    pyro.set_rng_seed(0)
    from sklearn.datasets import load_diabetes

    xs, ys = load_diabetes(return_X_y=True)
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w + b, sigma), obs=y[idx])

    kernel = SGLD(
        model, 1e-2, subsample_size={"data": 32}, preconditioner="rmsprop",
        health=Health(every=50),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True)
        mcmc.run(x, y)
    pattern = re.compile(r"site 'sigma'.*prior standard deviations.*RMSprop's M grows")
    assert any(pattern.search(str(w.message)) for w in caught)
    events = [e for e in kernel.diagnostics()["health"] if e["check"] == "runaway"]
    assert "sigma" in {e["site"] for e in events}
    assert float(mcmc.get_samples()["sigma"].max()) > 50.0  # the runaway did happen


# -- case 6: a plain-function model around a converted nn.Sequential ---------------------------
def _converted_sequential():
    from pyro.nn.module import to_pyro_module_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    to_pyro_module_(net)
    for layer in (net[0], net[2]):
        for name, value in list(layer.named_parameters(recurse=False)):
            prior = dist.Normal(0.0, 1.0).expand(value.shape).to_event(value.dim())
            setattr(layer, name, PyroSample(prior))
    x = torch.randn(200, 5)
    return net, x, (x[:, 0] > 0).long()


def _touch(net):
    for layer in (net[0], net[2]):
        layer.weight, layer.bias  # noqa: B018 (the access samples the weights)


@pytest.mark.parametrize("modules", [False, True])
def test_plain_function_around_a_converted_sequential(seed, modules):
    """The reported model touches the weights in a plain function: the error says why that does
    not help and what works; both remedies it names then sample, and BNP finds both layers."""
    net, x, y = _converted_sequential()

    def reported(x, y):
        _touch(net)
        with pyro.plate("data", x.shape[0]) as idx:
            pyro.sample("obs", dist.Categorical(logits=net(x[idx])), obs=y[idx])

    kw = {"modules": net} if modules else {}
    message = (
        r"'0\.weight' is inside the subsampled plate 'data'.*plain-function model.*does not "
        r"help.*PyroModule.*_pyro_context"
    )
    with pytest.raises(ValueError, match=message):
        MCMC(SGLD(reported, 1e-3, subsample_size={"data": 32}, **kw), 5, 0).run(x, y)

    class Model(PyroModule):  # remedy 1: a PyroModule model holding (a fresh) network
        def __init__(self):
            super().__init__()
            self.net = _converted_sequential()[0]  # one that has not run outside it

        def forward(self, x, y):
            _touch(self.net)
            with pyro.plate("data", x.shape[0]) as idx:
                pyro.sample("obs", dist.Categorical(logits=self.net(x[idx])), obs=y[idx])

    def in_context(x, y):  # remedy 2: the function's body under the network's context
        with net._pyro_context:
            reported(x, y)

    remedies = [(Model(), {}), (in_context, {"modules": net})]
    for model, extra in remedies:
        kernel = SGLD(model, 1e-3, subsample_size={"data": 32}, **extra)
        mcmc = MCMC(kernel, num_samples=30, warmup_steps=20, disable_progbar=True)
        mcmc.run(x, y)  # filterwarnings=error: BNP found the layers (no "acts as" warning)
        names = {"0.weight", "0.bias", "2.weight", "2.bias"}
        if isinstance(model, Model):
            names = {f"net.{n}" for n in names}
        samples = mcmc.get_samples()
        assert set(samples) == names
        assert samples[min(names)].shape[0] == 30
        assert len(kernel.layers) == 2
        # Pyro's own tools take the same model: NUTS's set-up trace and Predictive
        pyro.infer.Predictive(model, samples)(x, y)


# -- case 8: one step-size suggestion in every warning and error of a run ----------------------
def test_warnings_and_errors_suggest_one_step_size(seed):
    """The BNP prior warning and the exploding-chain error of the same run name one number:
    half the layers' stability bound ``2 eps / nu`` where that is below ``eps / 10``."""
    from test_core import StiffNet, _data

    x, y = _data()
    kernel = SGLD(StiffNet(), 1e-2, max_abs_param=3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="the chain is exploding") as error:
            MCMC(kernel, num_samples=2000, warmup_steps=0, disable_progbar=True).run(x, y)
    (warning,) = [str(w.message) for w in caught if "BNP layer 'fc'" in str(w.message)]
    nu = kernel.preconditioner.prior_stability(1e-2, kernel.preconditioner.priors)["fc"]
    suggestion = kernel.suggest_step_size(1e-2)
    assert nu > 20.0  # the bound is the binding one here: 2 eps / nu / 2 < eps / 10
    assert suggestion == pytest.approx(1e-2 / nu, rel=1e-6)
    assert f"e.g. {suggestion:.2g}" in warning
    assert f"e.g. {suggestion:.2g}" in str(error.value)
    # without a bound (RMSprop), the suggestion is a tenth of the step size
    assert SGLD(StiffNet(), 1e-2, preconditioner="rmsprop").suggest_step_size(1e-2) == 1e-3

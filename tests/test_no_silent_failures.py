"""The eight silent failures reported by a new user (docs/usage.md, "Faults and bad input"):
each now ends in a correct result or in an error/warning that names the site and the cause."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from sgld_models import linreg, make_linreg_data

from pyro_bnp import SGLD


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

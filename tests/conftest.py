from __future__ import annotations

import pyro
import pytest
import torch
from pyro.ops.stats import effective_sample_size

# The test models are tiny: intra-op threads only add contention (measured: a 300-row backward pass
# took 28 ms with 2 threads on a busy 2-core machine, 0.2 ms with 1).
torch.set_num_threads(1)


def ess_per_coordinate(draws: torch.Tensor) -> torch.Tensor:
    """ESS of each coordinate of draws shaped [chain, draw, dim].

    Pyro's estimator, except for long chains: its running minimum allocates ``draws^2`` memory
    (320 GB for 200k draws), so beyond 20k draws per chain ArviZ's FFT-based split-chain
    ``ess(method="mean")`` is used.
    """
    if draws.shape[1] <= 20_000:
        return effective_sample_size(draws.double(), chain_dim=0, sample_dim=1)
    import arviz_stats
    import xarray as xr

    da = xr.DataArray(draws.double().numpy(), dims=("chain", "draw", "dim"))
    return torch.as_tensor(arviz_stats.ess(da, method="mean").values)


def max_rel(a, b):
    """Largest relative difference of two dicts of draws: max over sites of max|a - b| / max|b|."""
    return max(float((a[k] - b[k]).abs().max()) / (float(b[k].abs().max()) + 1e-12) for k in b)


@pytest.fixture(autouse=True)
def _clear_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def seed(request):
    """A fixed seed per test, printed so that a failure can be replayed."""
    value = 20261122
    pyro.set_rng_seed(value)
    print(f"seed={value}")
    return value

"""Property-based tests: any kernel arguments, schedules, plate layouts, shapes and dtypes end in a
correct run or a clear ValueError that names the problem (never a hang or a silent wrong result).

Bounded in CI (profile ``ci``); ``HYPOTHESIS_PROFILE=long make test`` runs the long mode.
"""

from __future__ import annotations

import math
import os
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pyro.infer import MCMC
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_bnp import BNP, SGLD, schedules

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def model_single(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1], dtype=x.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.ones((), dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, s), obs=y[idx])


def model_nested(x, y):
    """Vector observations: plate "data" over rows, plate "out" over 2 outputs."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1], 2, dtype=x.dtype), 1.0).to_event(2))
    with pyro.plate("out", 2, dim=-1):
        s = pyro.sample("s", dist.HalfNormal(torch.ones((), dtype=x.dtype)))
        with pyro.plate("data", x.shape[0], dim=-2) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w, s), obs=y[idx])


def model_event(x, y):
    """Observations as one event per row (to_event), no second plate."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1], 2, dtype=x.dtype), 1.0).to_event(2))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, 1.0).to_event(1), obs=y[idx])


class ModuleModel(PyroModule):
    """A PyroModule regression: its weights take the kernel's PyroModule cache path."""

    def __init__(self, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc = PyroModule[nn.Linear](d, 1).to(dtype)
        zero = torch.zeros((), dtype=dtype)
        self.fc.weight = PyroSample(dist.Normal(zero, 1.0).expand([1, d]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(zero, 1.0).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.fc.weight, self.fc.bias  # noqa: B018  (sampled before the plate)
        s = pyro.sample("s", dist.HalfNormal(torch.ones((), dtype=x.dtype)))
        with pyro.plate("data", x.shape[0]) as idx:
            pyro.sample("y", dist.Normal(self.fc(x[idx]).squeeze(-1), s), obs=y[idx])


MODELS = {"single": model_single, "nested": model_nested, "event": model_event, "module": None}

VALID = {
    "step": st.one_of(
        st.floats(min_value=1e-6, max_value=3e-3),
        st.builds(lambda a: schedules.Polynomial(a, 10.0, 0.6), st.floats(1e-6, 1e-2)),
        st.builds(lambda a: schedules.Cyclical(a, 40, 2), st.floats(1e-6, 3e-3)),
    ),
    "temperature": st.floats(0.0, 2.0),
    "thin": st.integers(1, 3),
    "subsample": st.one_of(
        st.none(), st.integers(1, 45), st.builds(lambda b: {"data": b}, st.integers(1, 45))
    ),
    "precond": st.sampled_from(["identity", "rmsprop", "bnp", "bnp+rmsprop", "bnp-others"]),
}
INVALID = {
    "step": st.sampled_from(
        [0.0, -1e-3, math.nan, math.inf, True, "0.1", lambda t: math.nan, lambda t: -1.0]
    ),
    "temperature": st.sampled_from([-0.5, math.nan, math.inf, "1"]),
    "thin": st.sampled_from([0, -1, 1.5, True]),
    "subsample": st.sampled_from(
        [0, -2, {"nope": 3}, {"data": 0}, {"data": 10_000}, {"out": 1}, 2.5, {"data": 1.5}]
    ),
    "precond": st.sampled_from(["bogus", 3, None]),
}

DOCUMENTED_WARNINGS = ("no Linear/Conv layer", "lambda_max(M Lambda_prior)")
KEYWORDS = (
    "step_size", "temperature", "thin", "subsample_size", "plate", "preconditioner",
    "schedule", "local latent",
)  # fmt: skip


@given(
    layout=st.sampled_from(sorted(MODELS)),
    n=st.integers(1, 40),
    d=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    broken=st.sampled_from([None, None, None, *sorted(VALID)]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_any_arguments_run_or_fail_clearly(layout, n, d, dtype, broken, data, seed):
    args = {k: data.draw(INVALID[k] if k == broken else VALID[k], label=k) for k in VALID}
    if args["subsample"] == {"out": 1} and layout == "nested":
        args["subsample"] = {"out": 0}  # "out" holds a latent site: keep this one invalid
    pyro.set_rng_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype)
    if layout in ("nested", "event"):
        y = torch.randn(n, 2, generator=g, dtype=dtype)
    model = MODELS[layout] or ModuleModel(d, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            kernel = SGLD(
                model, step_size=args["step"], subsample_size=args["subsample"],
                preconditioner=BNP(others="rmsprop")
                if args["precond"] == "bnp-others" else args["precond"],
                temperature=args["temperature"],
                thin=args["thin"],
            )  # fmt: skip
            mcmc = MCMC(kernel, num_samples=4, warmup_steps=3, disable_progbar=True)
            mcmc.run(x, y)
        except ValueError as err:
            msg = str(err)
            assert any(k in msg for k in KEYWORDS), msg
            event(f"ValueError (broken={broken}): {msg[:60]}")
            return
        except RuntimeError as err:  # a diverging chain: the error must say what to do
            assert "step size" in str(err), str(err)
            event("RuntimeError")
            return
    event(f"ran {layout} (broken={broken})")
    for w in caught:  # only the documented warnings
        assert any(k in str(w.message) for k in DOCUMENTED_WARNINGS), str(w.message)
    samples = mcmc.get_samples()
    w = samples["fc.weight" if layout == "module" else "w"]
    assert w.shape[0] == 4 and w.dtype == dtype
    for k, v in samples.items():
        assert torch.isfinite(v).all(), k
    diag = kernel.diagnostics()
    assert len(diag["lp"]) == 4 and len(diag["step_size"]) == 4
    assert all(e > 0 and math.isfinite(e) for e in diag["step_size"])
    if isinstance(args["subsample"], int) and args["subsample"] <= n:
        assert kernel.subsample_size == {"data": args["subsample"]}
    # an invalid argument never runs silently (a too-large batch for tiny n is the exception:
    # the error case is covered by {"data": 10_000})
    assert broken is None, f"invalid {broken}={args[broken]!r} was accepted"


def test_long_profile_is_registered():
    assert settings.get_profile("long").max_examples == 1000
    with pytest.raises(Exception):  # noqa: B017 - hypothesis raises InvalidArgument
        settings.get_profile("nope")

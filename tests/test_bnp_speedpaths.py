"""The fast paths of BNP and of the layer statistics agree with the plain formulas."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import Tensor, nn

from pyro_bnp.bnp import BNP
from pyro_bnp.layers import RunningInputStats
from pyro_bnp.preconditioners import LayerRef, standard_normal_like

DT = torch.float64

# (id, layer, input shape): every layout the fused step handles
LAYERS = [
    ("dense", lambda: nn.Linear(4, 3), (7, 4)),
    ("dense_nobias", lambda: nn.Linear(4, 3, bias=False), (5, 4)),
    ("dense_n1", lambda: nn.Linear(3, 2), (1, 3)),
    ("conv2d_g2", lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (3, 4, 5, 5)),
    ("conv2d_nobias", lambda: nn.Conv2d(2, 3, (2, 3), padding=1, bias=False), (2, 2, 4, 3)),
    ("conv1d_g2", lambda: nn.Conv1d(4, 2, 3, groups=2, stride=2), (3, 4, 6)),
]


def _setup(
    make: object, input_shape: tuple[int, ...], seed: int = 0
) -> tuple[LayerRef, dict[str, Tensor]]:
    assert callable(make)
    module = make().to(DT)
    gen = torch.Generator().manual_seed(seed)
    dense = isinstance(module, nn.Linear)
    num_in = module.in_features if dense else module.in_channels
    shape = (1, num_in) + (1,) * (len(input_shape) - 2)
    scale = torch.logspace(-1, 1, num_in, dtype=DT).view(shape)
    offset = torch.randn(num_in, generator=gen, dtype=DT).view(shape) * 3
    stats = RunningInputStats(num_in, spatial_dims=0 if dense else len(input_shape) - 2)
    for _ in range(3):
        stats.observe(torch.randn(input_shape, generator=gen, dtype=DT) * scale + offset)
    has_bias = module.bias is not None
    ref = LayerRef(
        name="layer",
        kind="linear" if dense else "conv",
        weight="layer.weight",
        bias="layer.bias" if has_bias else None,
        stats=stats,
        groups=int(getattr(module, "groups", 1)),
    )
    params = {"layer.weight": torch.randn(module.weight.shape, generator=gen, dtype=DT)}
    if has_bias:
        params["layer.bias"] = torch.randn(module.bias.shape, generator=gen, dtype=DT)
    params["other"] = torch.randn(2, generator=gen, dtype=DT)
    return ref, params


@pytest.mark.parametrize("others", ["identity", "rmsprop"])
@pytest.mark.parametrize("layer", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 1e-70])
def test_fused_step_matches_generic(layer: tuple, temperature: float, others: str) -> None:
    """BNP's fused parts (noise minus drift, move) equal the SGLD equation from its maps alone.

    The reference is ``theta + s A (xi - k A^T g)`` written here from :meth:`apply_at` and
    :meth:`apply_a` (no fused code). 1e-70: the noise scale is below the integrator's range
    for fused scalars, so its tiny-scale guard runs.
    """
    _, make, shape = layer
    ref, params = _setup(make, shape)
    pre = BNP(others=others)
    pre.init(params, num_data=50.0, layers=(ref,))
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    pre.update(grads)
    eps = 1e-3
    fused = pre.step(params, grads, eps, temperature, torch.Generator().manual_seed(5))
    xi = standard_normal_like(params, torch.Generator().manual_seed(5))
    s, half = math.sqrt(eps * temperature), eps / 2
    at = pre.apply_at(grads)
    au = pre.apply_a({k: xi[k] - (half / s) * at[k] for k in params})
    generic = {k: params[k] + s * au[k] for k in params}
    assert list(fused) == list(params)
    for k in params:
        assert fused[k].shape == params[k].shape
        torch.testing.assert_close(fused[k], generic[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layer", LAYERS, ids=[c[0] for c in LAYERS])
def test_fused_step_leaves_inputs_alone(layer: tuple) -> None:
    _, make, shape = layer
    ref, params = _setup(make, shape)
    pre = BNP()
    pre.init(params, layers=(ref,))
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    before = copy.deepcopy((params, grads))
    pre.update(grads)
    pre.step(params, grads, 1e-2, 1.0, torch.Generator().manual_seed(0))
    for d, d0 in zip((params, grads), before, strict=True):
        for k in d:
            assert torch.equal(d[k], d0[k])


@pytest.mark.parametrize("init", ["batch", "paper"])
@pytest.mark.parametrize("shape", [(16, 5), (2, 3, 5), (1, 5)], ids=["2d", "3d", "one_row"])
def test_dense_observe_matches_the_plain_average(init: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(2)
    stats = RunningInputStats(5, rho=0.9, init=init)
    mean, var = torch.zeros(5, dtype=DT), torch.ones(5, dtype=DT)
    for t in range(4):
        h = torch.randn(shape, generator=gen, dtype=DT) * 2 + 1
        rows = h.reshape(-1, 5)
        m = rows.mean(0)
        v = (rows - m).square().mean(0) if rows.shape[0] > 1 else (m - mean).square()
        if t == 0 and init == "batch":
            mean, var = m, v
        else:
            mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v
        stats.observe(h)
        torch.testing.assert_close(stats.mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stats.var, var, rtol=1e-12, atol=1e-14)
        assert stats.var_max() == float(stats.var.max())


def test_observe_replaces_and_never_tracks_gradients() -> None:
    stats = RunningInputStats(3)
    stats.mean = torch.zeros(3, requires_grad=True)  # odd, but must not build a graph
    h = torch.randn(8, 3, requires_grad=True)
    for _ in range(2):
        mean, var = stats.mean, stats.var
        mean0, var0 = mean.detach().clone(), var.clone()
        with torch.enable_grad():
            stats.observe(h * 2)
        assert stats.mean is not mean and stats.var is not var
        assert torch.equal(mean.detach(), mean0) and torch.equal(var, var0)
        assert not stats.mean.requires_grad and not stats.var.requires_grad


@pytest.mark.parametrize("spatial_dims", [0, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
def test_non_finite_batch_is_skipped(spatial_dims: int, bad: float) -> None:
    shape = (4, 3) if spatial_dims == 0 else (4, 3, 2, 2)
    gen = torch.Generator().manual_seed(3)
    for init in ("batch", "paper"):
        stats = RunningInputStats(3, init=init, spatial_dims=spatial_dims)
        good = torch.randn(shape, generator=gen, dtype=DT)
        stats.observe(good)
        mean, var = stats.mean, stats.var
        h = torch.randn(shape, generator=gen, dtype=DT)
        h.view(-1)[5] = bad  # 1e300: finite input whose squared deviations overflow
        stats.observe(h)
        assert stats.num_skipped == 1 and stats.num_batches == 1
        assert stats.mean is mean and stats.var is var
        # the first batch of init="batch" too
        fresh = RunningInputStats(3, init=init, spatial_dims=spatial_dims)
        fresh.observe(h)
        assert fresh.num_skipped == 1 and fresh.num_batches == 0
        assert torch.equal(fresh.var, torch.ones(3)) and fresh.var_max() == 1.0


def test_finite_batch_is_folded_into_non_finite_running_values() -> None:
    # as before the single max check: decided on the batch, not on the running values
    stats = RunningInputStats(2, init="paper")
    stats.var = torch.tensor([1.0, math.nan])
    stats.observe(torch.randn(6, 2))
    assert stats.num_batches == 1 and stats.num_skipped == 0
    assert math.isnan(stats.var_max())


def test_var_max_cache_follows_the_tensor() -> None:
    stats = RunningInputStats(4)
    stats.observe(torch.randn(10, 4))
    assert stats.var_max() == float(stats.var.max())
    stats.var = torch.tensor([1.0, 5.0, 2.0, 3.0])  # replaced
    assert stats.var_max() == 5.0
    stats.var.mul_(2.0)  # modified in place
    assert stats.var_max() == 10.0
    stats.load_state_dict({**stats.state_dict(), "var": torch.tensor([7.0, 1.0, 1.0, 1.0])})
    assert stats.var_max() == 7.0
    stats.reset()
    assert stats.var_max() == 1.0
    clone = pickle.loads(pickle.dumps(stats))
    assert clone.var_max() == 1.0
    del clone.__dict__["_var_max"]  # an object pickled before the cache existed
    assert clone.var_max() == 1.0


def test_refresh_uses_current_statistics_after_replacement() -> None:
    ref, params = _setup(LAYERS[0][1], LAYERS[0][2])
    pre = BNP()
    pre.init(params, layers=(ref,))
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    pre.update(grads)
    m0 = pre.dense_matrix("layer", 0)
    stats = ref.stats
    snapshot = (stats.mean, stats.var)
    stats.observe(torch.randn(7, 4, dtype=DT) * 5)
    pre.update(grads)
    assert not torch.allclose(pre.dense_matrix("layer", 0), m0)
    stats.mean, stats.var = snapshot  # what the kernel does on a rejected proposal
    pre.update(grads)
    torch.testing.assert_close(pre.dense_matrix("layer", 0), m0, rtol=0, atol=0)


def test_frozen_statistics_unhook_the_layers_and_thawing_rehooks_them() -> None:
    """After ``freeze_after_warmup`` the layers carry no hooks (their calls stay on torch's
    fast path) and post-warmup updates fold nothing in; thawing the statistics by hand brings
    the hooks back at the next evaluation."""
    from bnp_models import LinearRegression

    from pyro_bnp import SGLD

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=gen, dtype=DT) * torch.tensor([0.3, 1.0, 3.0], dtype=DT)
    y = x.sum(-1) + torch.randn(60, generator=gen, dtype=DT)
    kernel = SGLD(
        LinearRegression(3),
        1e-4,
        subsample_size={"data": 20},
        preconditioner=BNP(freeze_after_warmup=True),
    )
    torch.manual_seed(1)
    kernel.setup(4, x, y)
    module = kernel.model.linear
    z = kernel.initial_params
    draws = []
    for _ in range(10):
        z = kernel.sample(z)
        draws.append(z["linear.weight"])
    (layer,) = kernel.layers
    assert layer.stats.frozen and not module._forward_pre_hooks
    assert layer.stats.num_batches == 5  # the initial evaluation and 4 warmup updates
    assert torch.stack(draws).unique(dim=0).shape[0] == 10  # the chain moved

    layer.stats.frozen = False
    z = kernel.sample(z)
    assert module._forward_pre_hooks and layer.stats.num_batches == 6
    assert all(bool(torch.isfinite(v).all()) for v in z.values())
    kernel.cleanup()
    assert not module._forward_pre_hooks


def test_others_rmsprop_is_bnp_on_layers_and_rmsprop_elsewhere() -> None:
    """``M`` is block diagonal: plain BNP's blocks on the layer, RMSprop's ``G`` on the rest."""
    ref, params = _setup(LAYERS[0][1], LAYERS[0][2])
    pre, plain = BNP(others="rmsprop"), BNP()
    for p in (pre, plain):
        p.init(params, num_data=50.0, layers=(ref,))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # V averages several gradients
        grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) * 4 for k, v in params.items()}
        pre.update(grads)
        plain.update(grads)
    assert pre.others is not None
    g_other = pre.others.diagonal()["other"]
    drift, drift_plain = pre.drift(grads), plain.drift(grads)
    torch.testing.assert_close(drift["other"], g_other * grads["other"], rtol=1e-12, atol=0)
    assert not torch.allclose(drift["other"], grads["other"])  # G is not the identity here
    xi = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    noise, noise_plain = pre.noise(xi), plain.noise(xi)
    torch.testing.assert_close(noise["other"], g_other.sqrt() * xi["other"], rtol=1e-12, atol=0)
    for k in ("layer.weight", "layer.bias"):
        torch.testing.assert_close(drift[k], drift_plain[k], rtol=0, atol=0)
        torch.testing.assert_close(noise[k], noise_plain[k], rtol=0, atol=0)
    # freezing freezes G too; a state round trip restores it
    pre.freeze()
    assert pre.others.frozen
    pre.update({k: 100 * v for k, v in grads.items()})
    torch.testing.assert_close(pre.others.diagonal()["other"], g_other)
    again = BNP(others="rmsprop")
    again.init(params, num_data=50.0, layers=(ref,))
    again.load_state_dict(pre.state_dict())
    torch.testing.assert_close(again.drift(grads)["other"], drift["other"])
    assert pre.config()["others"] == "rmsprop" and "others=RMSprop(" in repr(pre)
    with pytest.raises(ValueError, match="others state"):
        plain.load_state_dict(pre.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"others": "adam"}, "others must be"),
        ({"others": None}, "others must be"),
        ({"others": "rmsprop", "rmsprop": None}, None),
        ({"others": "rmsprop", "prior_cap": 1.0}, None),
    ],
)
def test_others_validation(kwargs: dict, match: str | None) -> None:
    if match is None:
        assert BNP(**kwargs).others is not None
    else:
        with pytest.raises(ValueError, match=match):
            BNP(**kwargs)


def test_others_with_rmsprop_is_refused() -> None:
    from pyro_bnp import RMSprop

    with pytest.raises(ValueError, match="others applies to plain BNP only"):
        BNP(rmsprop=RMSprop(), others="rmsprop")


def test_others_combines_with_prior_cap() -> None:
    """``prior_cap`` acts on the layers only, ``others`` on the other sites only: together, the
    layers move exactly as with the cap alone and the other site as under RMSprop."""
    ref, params = _setup(LAYERS[0][1], LAYERS[0][2])
    both, cap = BNP(prior_cap=1.0, others="rmsprop"), BNP(prior_cap=1.0)
    priors = {"layer": (1.0, 1e-4)}  # a stiff weight prior: the cap engages
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    eps = 1e-2
    for p in (both, cap):
        p.init(params, num_data=50.0, layers=(ref,))
        p.set_priors(priors)
        p.update(grads, eps)  # the cap follows the step size passed to update
    a = both.step(params, grads, eps, 1.0, torch.Generator().manual_seed(9))
    b = cap.step(params, grads, eps, 1.0, torch.Generator().manual_seed(9))
    plain = BNP()
    plain.init(params, num_data=50.0, layers=(ref,))
    plain.update(grads)
    assert plain.prior_stability(eps, priors)["layer"] > 2.0  # unstable without the cap
    assert cap.prior_stability(eps, priors)["layer"] <= 1.0 + 1e-9
    for k in ("layer.weight", "layer.bias"):
        assert torch.equal(a[k], b[k]), k
    assert both.others is not None
    g = both.others.diagonal()["other"]
    xi = torch.Generator().manual_seed(9)
    noise = {k: torch.randn(params[k].shape, generator=xi, dtype=DT) for k in sorted(params)}
    expected = params["other"] + math.sqrt(eps) * g.sqrt() * noise["other"] - eps / 2 * g
    torch.testing.assert_close(a["other"], expected, rtol=1e-12, atol=1e-14)

"""Exact algebra of BNP and BNP+RMSprop against explicit per-neuron matrices (float64)."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
from torch import Tensor, nn

from pyro_bnp.bnp import BNP, balance_factor, floored_variance
from pyro_bnp.layers import RunningInputStats
from pyro_bnp.preconditioners import LayerRef, Preconditioner, RMSprop

DT = torch.float64
EPS1, EPS2 = 1e-2, 1e-4
NUM_DATA = 50.0


@dataclass
class Case:
    """A layer: the torch module gives shapes; an input batch gives the statistics."""

    id: str
    module: nn.Module
    input_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv"

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def groups(self) -> int:
        return int(getattr(self.module, "groups", 1))


def _cases() -> list[Case]:
    return [
        Case("dense", nn.Linear(4, 3), (7, 4)),
        Case("dense_nobias", nn.Linear(4, 3, bias=False), (5, 4)),
        Case("dense_n1", nn.Linear(3, 2), (1, 3)),
        Case("conv2d_g2_s2_p1", nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (3, 4, 5, 5)),
        Case("conv2d_nobias", nn.Conv2d(2, 3, (2, 3), padding=1, bias=False), (2, 2, 4, 3)),
        Case("conv1d_g2", nn.Conv1d(4, 2, 3, groups=2, stride=2), (3, 4, 6)),
    ]


CASES = _cases()
SMALL = ["dense", "dense_nobias", "conv2d_g2_small", "conv1d_g2"]


def _small_case(name: str) -> Case:
    if name == "conv2d_g2_small":
        return Case(name, nn.Conv2d(4, 2, 2, stride=2, padding=1, groups=2), (3, 4, 3, 3))
    return next(c for c in CASES if c.id == name)


def _setup(case: Case, seed: int = 0) -> tuple[LayerRef, dict[str, Tensor], RunningInputStats]:
    """Statistics from a badly scaled, non-centred input batch; random params."""
    gen = torch.Generator().manual_seed(seed)
    module = case.module.to(DT)
    num_in = module.in_features if case.kind == "linear" else module.in_channels
    sd = torch.logspace(-1, 1, num_in, dtype=DT)
    mean = torch.randn(num_in, generator=gen, dtype=DT) * 3
    shape = (1, num_in) + (1,) * (len(case.input_shape) - 2)
    x = torch.randn(case.input_shape, generator=gen, dtype=DT) * sd.view(shape) + mean.view(shape)
    module(x)  # the layer accepts this input (stride, padding, groups)
    spatial_dims = 0 if case.kind == "linear" else len(case.input_shape) - 2
    stats = RunningInputStats(num_in, spatial_dims=spatial_dims)
    stats.observe(x)
    ref = LayerRef(
        name="layer",
        kind=case.kind,
        weight="layer.weight",
        bias="layer.bias" if case.has_bias else None,
        stats=stats,
        groups=case.groups,
    )
    params = {"layer.weight": torch.randn(module.weight.shape, generator=gen, dtype=DT)}
    if case.has_bias:
        params["layer.bias"] = torch.randn(module.bias.shape, generator=gen, dtype=DT)
    params["sigma"] = torch.randn(2, generator=gen, dtype=DT)
    return ref, params, stats


# -- flattening: [bias, vec(weight), sigma] ----------------------------------------------
def _order(params: dict[str, Tensor]) -> list[str]:
    return [k for k in ("layer.bias", "layer.weight", "sigma") if k in params]


def _flat(d: dict[str, Tensor], order: list[str]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in order])


def _unflat(v: Tensor, params: dict[str, Tensor], order: list[str]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k in order:
        n = params[k].numel()
        out[k] = v[i : i + n].reshape(params[k].shape)
        i += n
    return out


def _neuron_index(params: dict[str, Tensor], o: int) -> list[int]:
    w = params["layer.weight"]
    out, fan_in = w.shape[0], w[0].numel()
    off = out if "layer.bias" in params else 0
    idx = [o] if "layer.bias" in params else []
    return idx + [off + o * fan_in + j for j in range(fan_in)]


def _sigma_index(params: dict[str, Tensor]) -> list[int]:
    n = sum(v.numel() for k, v in params.items() if k != "sigma")
    return [n, n + 1]


# -- the explicit matrices, built independently from the formulas -------------------------
def _p_block(case: Case, stats: RunningInputStats, params: dict[str, Tensor], o: int):
    w = params["layer.weight"]
    out, cin_g = w.shape[0], w.shape[1]
    ksize = math.prod(w.shape[2:])
    s2 = stats.var + EPS1 * stats.var.max() + EPS2
    fan_in = cin_g * ksize
    spatial = stats.spatial_size if case.kind == "conv" else 1
    q2 = max(fan_in / stats.batch_size, math.sqrt(spatial))
    group = o // (out // case.groups)
    chans = torch.arange(cin_g) + group * cin_g
    mu = stats.mean[chans].repeat_interleave(ksize)
    s = s2[chans].sqrt().repeat_interleave(ksize)
    if case.has_bias:
        p = torch.eye(fan_in + 1, dtype=DT)
        p[0, 1:] = -mu / s
        p[1:, 1:] = torch.diag(1 / s)
    else:
        p = torch.diag(1 / s)
    return p, q2


def _expected_full(case, stats, params, gz: dict[str, Tensor] | None = None) -> Tensor:
    """Block-diagonal M: one (1/q2) P G_z P^T block per neuron, G (or I) on ``sigma``."""
    order = _order(params)
    dim = sum(params[k].numel() for k in order)
    m = torch.zeros(dim, dim, dtype=DT)
    gflat = _flat(gz, order) if gz is not None else torch.ones(dim, dtype=DT)
    for o in range(params["layer.weight"].shape[0]):
        p, q2 = _p_block(case, stats, params, o)
        idx = torch.tensor(_neuron_index(params, o))
        m[idx[:, None], idx[None, :]] = (p * gflat[idx]) @ p.T / q2
    si = torch.tensor(_sigma_index(params))
    m[si, si] = gflat[si]
    return m


def _effective_m(pre: BNP, params: dict[str, Tensor]) -> Tensor:
    order = _order(params)
    dim = sum(params[k].numel() for k in order)

    def apply(v: Tensor) -> Tensor:
        return _flat(pre.drift(_unflat(v, params, order)), order)

    return torch.func.vmap(apply)(torch.eye(dim, dtype=DT)).T


def _gz_reference(case, stats, params, grads) -> dict[str, Tensor]:
    """g_z = (1/q) P^T g per neuron (independent of the package), plus raw g on sigma."""
    order = _order(params)
    g = _flat(grads, order)
    z = g.clone()
    for o in range(params["layer.weight"].shape[0]):
        p, q2 = _p_block(case, stats, params, o)
        idx = torch.tensor(_neuron_index(params, o))
        z[idx] = p.T @ g[idx] / math.sqrt(q2)
    return _unflat(z, params, order)


def _mc_check(samples: Tensor, cov: Tensor, alpha: float = 1e-3) -> None:
    """Entry-wise z-test of the (known zero mean) empirical covariance, Bonferroni-corrected."""
    n = samples.shape[0]
    emp = samples.T @ samples / n
    d = cov.diag()
    se = ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()
    m = cov.shape[0] * (cov.shape[0] + 1) // 2
    z = NormalDist().inv_cdf(1 - alpha / (2 * m))
    worst = ((emp - cov).abs() / se).max().item()
    assert worst < z, f"max |emp - cov| / se = {worst:.2f} >= {z:.2f}"


# -- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_drift_equals_explicit_m(case: Case) -> None:
    ref, params, stats = _setup(case)
    pre = BNP()
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    m = _effective_m(pre, params)
    expected = _expected_full(case, stats, params)
    torch.testing.assert_close(m, expected, rtol=1e-10, atol=1e-12)
    # the cheap form of DESIGN.md, on a random gradient (dense and bias only)
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    d = pre.drift(grads)
    order = _order(params)
    torch.testing.assert_close(_flat(d, order), expected @ _flat(grads, order))
    if case.kind == "linear" and case.has_bias:
        s2 = floored_variance(stats.var, EPS1, EPS2)
        q2 = balance_factor(params["layer.weight"].shape[1], stats.batch_size)
        gw, gb, mu = grads["layer.weight"], grads["layer.bias"], stats.mean
        cheap_w = (gw - gb[:, None] * mu[None, :]) / s2[None, :] / q2
        torch.testing.assert_close(d["layer.weight"], cheap_w)
        torch.testing.assert_close(d["layer.bias"], gb / q2 - cheap_w @ mu)
    torch.testing.assert_close(d["sigma"], grads["sigma"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dense_matrix_helper(case: Case) -> None:
    ref, params, stats = _setup(case, seed=3)
    pre = BNP()
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    out = params["layer.weight"].shape[0]
    for o in range(out):
        p, q2 = _p_block(case, stats, params, o)
        torch.testing.assert_close(pre.dense_matrix("layer", o), p @ p.T / q2)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("rms", [False, True], ids=["bnp", "bnp+rmsprop"])
def test_noise_covariance(name: str, rms: bool) -> None:
    case = _small_case(name)
    ref, params, stats = _setup(case, seed=5)
    pre = BNP(rmsprop=RMSprop() if rms else None)
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    gz = None
    if rms:
        gen = torch.Generator().manual_seed(6)
        grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) * 30 for k, v in params.items()}
        pre.update(grads)
        gz_ref = _gz_reference(case, stats, params, grads)
        gz = {k: 1.0 / ((v / NUM_DATA).abs() + 1e-5) for k, v in gz_ref.items()}
    else:
        pre.update({k: torch.zeros_like(v) for k, v in params.items()})
    order = _order(params)
    dim = sum(params[k].numel() for k in order)
    n = 200_000
    xi = torch.randn(n, dim, generator=torch.Generator().manual_seed(7), dtype=DT)
    draws = torch.func.vmap(lambda v: _flat(pre.noise(_unflat(v, params, order)), order))(xi)
    cov = _expected_full(case, stats, params, gz)
    _mc_check(draws, cov)
    # and exactly: A A^T == M == the drift's matrix
    a = torch.func.vmap(lambda v: _flat(pre.noise(_unflat(v, params, order)), order))(
        torch.eye(dim, dtype=DT)
    ).T
    torch.testing.assert_close(a @ a.T, cov)
    torch.testing.assert_close(_effective_m(pre, params), cov)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bnp_rmsprop_matrix(case: Case) -> None:
    ref, params, stats = _setup(case, seed=11)
    rms = RMSprop(alpha=0.9)
    pre = BNP(rmsprop=rms)
    assert pre.name == "bnp+rmsprop"
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    gen = torch.Generator().manual_seed(12)
    g1 = {k: torch.randn(v.shape, generator=gen, dtype=DT) * 20 for k, v in params.items()}
    g2 = {k: torch.randn(v.shape, generator=gen, dtype=DT) * 5 for k, v in params.items()}
    pre.update(g1)
    pre.update(g2)
    z1 = _gz_reference(case, stats, params, g1)
    z2 = _gz_reference(case, stats, params, g2)
    v = {k: 0.9 * (z1[k] / NUM_DATA) ** 2 + 0.1 * (z2[k] / NUM_DATA) ** 2 for k in z1}
    gz = {k: 1.0 / (x.sqrt() + 1e-5) for k, x in v.items()}
    m = _effective_m(pre, params)
    torch.testing.assert_close(m, m.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(m).min() > 0
    torch.testing.assert_close(m, _expected_full(case, stats, params, gz), rtol=1e-9, atol=1e-12)
    for o in range(params["layer.weight"].shape[0]):
        idx = torch.tensor(_neuron_index(params, o))
        torch.testing.assert_close(pre.dense_matrix("layer", o), m[idx[:, None], idx[None, :]])


@pytest.mark.parametrize("rms", [False, True], ids=["bnp", "bnp+rmsprop"])
@pytest.mark.parametrize("case", CASES[::2], ids=[c.id for c in CASES[::2]])
def test_step_temperature_zero_and_fused(case: Case, rms: bool) -> None:
    ref, params, _ = _setup(case, seed=21)
    pre = BNP(rmsprop=RMSprop() if rms else None)
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    gen = torch.Generator().manual_seed(22)
    grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    pre.update(grads)
    eps = 1e-3
    cold = pre.step(params, grads, eps, temperature=0.0)
    drift = pre.drift(grads)
    for k in params:
        torch.testing.assert_close(cold[k], params[k] - eps / 2 * drift[k])
    for temp in (1.0, 0.3):
        fused = pre.step(params, grads, eps, temp, torch.Generator().manual_seed(5))
        generic = Preconditioner.step(
            pre, params, grads, eps, temp, torch.Generator().manual_seed(5)
        )
        for k in params:
            torch.testing.assert_close(fused[k], generic[k], rtol=1e-12, atol=1e-14)


def test_float32_params_with_float64_stats() -> None:
    ref, params, _ = _setup(CASES[0])
    p32 = {k: v.float() for k, v in params.items()}
    pre = BNP()
    pre.init(p32, layers=[ref])
    out = pre.step(p32, p32, 1e-3, 1.0, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_frozen_bnp_is_constant() -> None:
    case = CASES[0]
    ref, params, stats = _setup(case)
    pre = BNP(rmsprop=RMSprop(), freeze_after_warmup=True)
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    pre.update(grads)
    pre.freeze()
    assert stats.frozen and pre.rmsprop is not None and pre.rmsprop.frozen
    before_stats = stats.state_dict()
    m0 = _effective_m(pre, params)
    stats.observe(torch.randn(9, 4, dtype=DT) * 100 + 7)
    pre.update({k: 50 * v for k, v in grads.items()})
    torch.testing.assert_close(stats.mean, before_stats["mean"])
    torch.testing.assert_close(stats.var, before_stats["var"])
    assert stats.num_batches == before_stats["num_batches"]
    torch.testing.assert_close(_effective_m(pre, params), m0)
    # a new chain un-freezes
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    assert not stats.frozen and not pre.frozen


def test_update_reads_new_statistics() -> None:
    ref, params, stats = _setup(CASES[0])
    pre = BNP()
    pre.init(params, layers=(ref,))
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    pre.update(zeros)
    m0 = pre.dense_matrix("layer", 0)
    stats.observe(torch.randn(7, 4, dtype=DT) * 10)
    pre.update(zeros)
    assert not torch.allclose(pre.dense_matrix("layer", 0), m0)


def test_state_dict_round_trip() -> None:
    case = CASES[3]
    ref, params, stats = _setup(case)
    pre = BNP(rmsprop=RMSprop())
    pre.init(params, num_data=NUM_DATA, layers=(ref,))
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    pre.update(grads)
    state = pre.state_dict()
    ref2, _, stats2 = _setup(case, seed=99)  # different statistics
    pre2 = BNP(rmsprop=RMSprop())
    pre2.init(params, num_data=NUM_DATA, layers=(ref2,))
    pre2.load_state_dict(state)
    torch.testing.assert_close(stats2.mean, stats.mean)
    torch.testing.assert_close(_effective_m(pre2, params), _effective_m(pre, params))
    plain = BNP()
    plain.init(params, layers=(ref2,))
    with pytest.raises(ValueError, match="rmsprop"):
        plain.load_state_dict(state)


def test_identity_and_rmsprop_on_other_sites() -> None:
    params = {"a": torch.randn(3, dtype=DT), "b": torch.randn(2, 2, dtype=DT)}
    pre = BNP()
    pre.init(params)
    g = {k: torch.randn_like(v) for k, v in params.items()}
    pre.update(g)
    for k in params:
        torch.testing.assert_close(pre.drift(g)[k], g[k])
        torch.testing.assert_close(pre.noise(g)[k], g[k])
    rms = RMSprop()
    ref_rms = RMSprop()
    pre = BNP(rmsprop=rms)
    pre.init(params, num_data=NUM_DATA)
    ref_rms.init(params, num_data=NUM_DATA)
    pre.update(g)
    ref_rms.update(g)
    for k in params:
        torch.testing.assert_close(pre.drift(g)[k], ref_rms.drift(g)[k])
        torch.testing.assert_close(pre.noise(g)[k], ref_rms.noise(g)[k])


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"rho": 1.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"eps1": -1.0}, "eps1"),
        ({"eps1": math.inf}, "eps1"),
        ({"eps2": 0.0}, "eps2"),
        ({"freeze_after_warmup": 1}, "freeze_after_warmup"),
        ({"rmsprop": "yes"}, "rmsprop"),
        ({"init": "zeros"}, "init"),
    ],
)
def test_constructor_validation(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        BNP(**kwargs)


def test_init_validation() -> None:
    ref, params, _ = _setup(CASES[0])
    bad = dict(params)
    bad["layer.weight"] = torch.zeros(3, 5, dtype=DT)
    with pytest.raises(ValueError, match="layers"):
        BNP().init(bad, layers=(ref,))
    with pytest.raises(ValueError, match="not in params"):
        BNP().init({"sigma": params["sigma"]}, layers=(ref,))
    with pytest.raises(ValueError, match="two layers"):
        BNP().init(
            params, layers=(ref, LayerRef("other", "linear", "layer.weight", None, ref.stats))
        )


def test_config_and_repr() -> None:
    pre = BNP(rmsprop=RMSprop(alpha=0.9))
    cfg = pre.config()
    assert cfg["rho"] == 0.99 and cfg["rmsprop_alpha"] == 0.9 and cfg["init"] == "batch"
    assert "RMSprop(" in repr(pre)
    assert BNP().name == "bnp"
    assert BNP(rho=0.9, init="paper").stats_options() == {"rho": 0.9, "init": "paper"}


def test_bnp_module_never_imports_pyro() -> None:
    src = Path(__file__).parents[1] / "pyro_bnp" / "bnp.py"
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for n in names:
            assert n.split(".")[0] != "pyro", n
            # only the pure-torch core (tests/test_core.py checks those import without Pyro)
            assert not n.startswith("pyro_bnp") or n in (
                "pyro_bnp.preconditioners",
                "pyro_bnp.chain",
            ), n

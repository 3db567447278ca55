"""Layer statistics, module discovery and hooks."""

from __future__ import annotations

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_bnp.bnp import BNP
from pyro_bnp.layers import LayerHooks, RunningInputStats, describe, find_layers

DT = torch.float64


def _scaled(shape: tuple[int, ...], seed: int, channel_dim: int = -1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    view = [1] * len(shape)
    view[channel_dim] = c
    sd = torch.logspace(-1, 1, c, dtype=DT).view(view)
    mean = torch.linspace(-5, 5, c, dtype=DT).view(view)
    return torch.randn(shape, generator=gen, dtype=DT) * sd + mean


# -- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "spatial_dims", "bn"),
    [
        ((16, 5), 0, nn.BatchNorm1d),
        ((6, 3, 7), 1, nn.BatchNorm1d),
        ((4, 3, 5, 6), 2, nn.BatchNorm2d),
    ],
    ids=["dense", "conv1d", "conv2d"],
)
def test_batch_statistics_equal_batchnorm(shape, spatial_dims, bn) -> None:
    x = _scaled(shape, 0, channel_dim=1)
    c = shape[1]
    stats = RunningInputStats(c, spatial_dims=spatial_dims)
    stats.observe(x)
    norm = bn(c, affine=False).to(DT).train()
    y = norm(x)
    view = [1, c] + [1] * spatial_dims
    mine = (x - stats.mean.view(view)) / (stats.var.view(view) + norm.eps).sqrt()
    torch.testing.assert_close(mine, y)
    assert stats.batch_size == shape[0]
    assert stats.spatial_size == math.prod(shape[2:])
    assert stats.mean.dtype == DT


@pytest.mark.parametrize("init", ["batch", "paper"])
def test_running_recursion_over_three_batches(init: str) -> None:
    rho = 0.9
    stats = RunningInputStats(3, rho=rho, init=init, spatial_dims=2)
    batches = [_scaled((n, 3, 4, 2), seed, channel_dim=1) for seed, n in enumerate((5, 2, 7))]
    if init == "batch":
        mu = batches[0].mean((0, 2, 3))
        var = batches[0].var((0, 2, 3), unbiased=False)
        rest = batches[1:]
    else:
        mu, var, rest = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), batches
    for b in rest:
        mu = rho * mu + (1 - rho) * b.mean((0, 2, 3))
        var = rho * var + (1 - rho) * b.var((0, 2, 3), unbiased=False)
    for b in batches:
        stats.observe(b)
    torch.testing.assert_close(stats.mean, mu)
    torch.testing.assert_close(stats.var, var)
    assert stats.num_batches == 3 and stats.batch_size == 7 and stats.spatial_size == 8


def test_dense_leading_dims_are_rows() -> None:
    x = _scaled((3, 4, 5), 1)
    stats = RunningInputStats(5)
    stats.observe(x)
    torch.testing.assert_close(stats.mean, x.reshape(12, 5).mean(0))
    torch.testing.assert_close(stats.var, x.reshape(12, 5).var(0, unbiased=False))
    assert stats.batch_size == 12 and stats.spatial_size == 1


def test_single_row_uses_running_mean_before_update() -> None:
    rho = 0.9
    stats = RunningInputStats(2, rho=rho)
    h1 = torch.tensor([[1.0, -3.0]], dtype=DT)
    stats.observe(h1)  # first batch: mu = h, var = (h - 0)^2
    torch.testing.assert_close(stats.mean, h1[0])
    torch.testing.assert_close(stats.var, h1[0] ** 2)
    h2 = torch.tensor([2.0, 1.0], dtype=DT)  # 1-d input: one row
    mu_prev, var_prev = stats.mean.clone(), stats.var.clone()
    stats.observe(h2)
    torch.testing.assert_close(stats.mean, rho * mu_prev + (1 - rho) * h2)
    torch.testing.assert_close(stats.var, rho * var_prev + (1 - rho) * (h2 - mu_prev) ** 2)
    assert stats.batch_size == 1
    # an unbatched conv input is one image, with spatial variance
    conv = RunningInputStats(2, spatial_dims=2)
    img = _scaled((2, 3, 3), 2, channel_dim=0)
    conv.observe(img)
    torch.testing.assert_close(conv.var, img.var((1, 2), unbiased=False))
    assert conv.batch_size == 1 and conv.spatial_size == 9


def test_frozen_nonfinite_nograd_and_state() -> None:
    stats = RunningInputStats(3)
    x = _scaled((8, 3), 3).requires_grad_(True)
    stats.observe(x * 2)
    assert not stats.mean.requires_grad and not stats.var.requires_grad
    state = stats.state_dict()
    bad = x.detach().clone()
    bad[0, 1] = math.nan
    stats.observe(bad)
    assert stats.num_skipped == 1 and stats.num_batches == 1
    torch.testing.assert_close(stats.mean, state["mean"])
    stats.frozen = True
    stats.observe(x.detach() + 100)
    torch.testing.assert_close(stats.mean, state["mean"])
    assert stats.num_batches == 1
    stats.frozen = False
    stats.observe(x.detach() + 100)
    other = RunningInputStats(3)
    other.load_state_dict(state)
    torch.testing.assert_close(other.mean, state["mean"])
    assert other.num_batches == 1
    state["mean"].add_(1.0)  # the saved tensors are copies
    assert not torch.equal(other.mean, state["mean"])


def test_stats_validation() -> None:
    with pytest.raises(ValueError, match="rho"):
        RunningInputStats(3, rho=1.0)
    with pytest.raises(ValueError, match="init"):
        RunningInputStats(3, init="zero")
    with pytest.raises(ValueError, match="expected an input"):
        RunningInputStats(3).observe(torch.zeros(4, 2))


# -- discovery ----------------------------------------------------------------------------
def _prior(*shape: int) -> dist.Distribution:
    return dist.Normal(0.0, 1.0).expand(list(shape)).to_event(len(shape))


def _bayes(module: PyroModule) -> PyroModule:
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, PyroSample(_prior(*p.shape)))
    return module


class Block(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _bayes(PyroModule[nn.Linear](6, 4, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).relu()


class Net(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _bayes(PyroModule[nn.Conv2d](2, 4, 3, stride=2, padding=1, groups=2))
        self.conv1d = _bayes(PyroModule[nn.Conv1d](4, 3, 2))
        self.seq = PyroModule[nn.Sequential](
            _bayes(PyroModule[nn.Linear](9, 6)), PyroModule[nn.Tanh](), Block()
        )
        self.plain = nn.Linear(4, 4)  # not Bayesian
        self.fixed_bias = PyroModule[nn.Linear](4, 2)  # weight latent, bias a parameter
        self.fixed_bias.weight = PyroSample(_prior(2, 4))
        self.det = PyroModule[nn.Linear](2, 1)  # deterministic weight
        self.det.weight = PyroSample(lambda self: torch.ones(1, 2))
        self.det.bias = PyroSample(_prior(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()  # [N, 4, 2, 2]
        h = self.conv1d(h.flatten(2)).relu()  # [N, 3, 3] -> 9 features
        h = self.seq(h.flatten(1))  # [N, 4]
        h = self.fixed_bias(self.plain(h))
        return self.det(h)


def _latent_sites(model: nn.Module, *args: torch.Tensor) -> list[str]:
    tr = poutine.trace(model).get_trace(*args)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


def test_find_layers_names_and_kinds() -> None:
    pyro.set_rng_seed(0)
    net = Net()
    x = torch.randn(5, 2, 4, 4)
    sites = _latent_sites(net, x)
    layers, hooks = find_layers(net, sites)
    by_name = {ref.name: ref for ref in layers}
    assert list(by_name) == ["conv", "conv1d", "seq.0", "seq.2.inner"]
    assert by_name["conv"].kind == "conv" and by_name["conv"].groups == 2
    assert by_name["conv"].weight == "conv.weight" and by_name["conv"].bias == "conv.bias"
    assert by_name["seq.0"].weight == "seq.0.weight" and by_name["seq.0"].kind == "linear"
    assert by_name["seq.2.inner"].bias is None
    for ref in layers:
        assert ref.weight in sites and (ref.bias is None or ref.bias in sites)
    assert len(hooks) == 4
    # an observed bias drops the layer
    cond = poutine.condition(net, data={"conv.bias": torch.zeros(4)})
    layers2, _ = find_layers(net, _latent_sites(cond, x))
    assert "conv" not in [r.name for r in layers2]


def test_find_layers_before_first_run_and_iterables() -> None:
    class Lazy(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            fc = PyroModule[nn.Linear](3, 2)
            _bayes(fc)
            self.fc = fc  # named by pyro only at first attribute access

    lazy = Lazy()
    layers, _ = find_layers([lazy], ["fc.weight", "fc.bias"])
    assert [(r.weight, r.bias) for r in layers] == [("fc.weight", "fc.bias")]
    seq = PyroModule[nn.Sequential](_bayes(PyroModule[nn.Linear](3, 2)))
    layers, _ = find_layers([seq, seq], ["0.weight", "0.bias"])
    assert [r.weight for r in layers] == ["0.weight"]
    positive = PyroModule[nn.Linear](3, 2, bias=False)
    positive.weight = PyroSample(dist.LogNormal(0.0, 1.0).expand([2, 3]).to_event(2))
    assert find_layers(positive, ["weight"])[0] == []


# -- hooks --------------------------------------------------------------------------------
def _mlp() -> PyroModule:
    return PyroModule[nn.Sequential](
        _bayes(PyroModule[nn.Linear](3, 5)),
        PyroModule[nn.Tanh](),
        _bayes(PyroModule[nn.Linear](5, 2)),
    )


def _all_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_only_inside_active() -> None:
    net = _mlp()
    layers, hooks = find_layers(net, ["0.weight", "0.bias", "2.weight", "2.bias"])
    x = _scaled((8, 3), 4).float()
    hooks.install()
    hooks.install()  # idempotent
    assert _all_hooks(net) == 2 and hooks.installed
    net(x)
    assert all(r.stats.num_batches == 0 for r in layers)
    with hooks.active():
        assert hooks.is_active
        net(x)
    assert not hooks.is_active
    assert all(r.stats.num_batches == 1 for r in layers)
    torch.testing.assert_close(layers[0].stats.mean, x.mean(0))
    net(x)
    assert all(r.stats.num_batches == 1 for r in layers)
    hooks.remove()
    assert _all_hooks(net) == 0 and not hooks.installed
    with hooks.active():
        net(x)
    assert all(r.stats.num_batches == 1 for r in layers)


def test_hooks_pickle() -> None:
    net = _mlp()
    layers, hooks = find_layers(net, ["0.weight", "0.bias", "2.weight", "2.bias"])
    hooks.install()
    x = torch.randn(4, 3)
    net2 = pickle.loads(pickle.dumps(net))  # the module alone, hooks installed
    assert net2(x).shape == (4, 2) and _all_hooks(net2) == 2
    net3, layers3, hooks3 = pickle.loads(pickle.dumps((net, layers, hooks)))
    with hooks3.active():
        net3(x)
    assert all(r.stats.num_batches == 1 for r in layers3)
    assert all(r.stats.num_batches == 0 for r in layers)
    hooks3.remove()
    assert _all_hooks(net3) == 0 and _all_hooks(net) == 2
    hooks.remove()
    assert _all_hooks(net) == 0


def test_describe_and_bnp_integration() -> None:
    net = _mlp()
    pre = BNP(rho=0.5)
    layers, hooks = find_layers(
        net, ["0.weight", "0.bias", "2.weight", "2.bias"], **pre.stats_options()
    )
    assert all(r.stats.rho == 0.5 for r in layers)
    hooks.install()
    x = _scaled((10, 3), 5).float()
    with hooks.active():
        net(x)
    info = describe(layers)
    st = layers[0].stats
    torch.testing.assert_close(info["0"]["scale"], (st.var + 1e-2 * st.var.max() + 1e-4).sqrt())
    assert info["0"]["q2"] == 1.0 and info["2"]["q2"] == 1.0
    assert info["0"]["num_batches"] == 1
    params = {
        "0.weight": torch.zeros(5, 3),
        "0.bias": torch.zeros(5),
        "2.weight": torch.zeros(2, 5),
        "2.bias": torch.zeros(2),
    }
    pre.init(params, num_data=10, layers=tuple(layers))
    pre.update(params)
    torch.testing.assert_close(pre.layer_summary()["0"]["s2"], info["0"]["scale"] ** 2)
    pre.freeze()
    with hooks.active():
        net(x * 3)
    assert st.num_batches == 1
    hooks.remove()


def test_layer_hooks_type() -> None:
    assert isinstance(find_layers(_mlp(), [])[1], LayerHooks)
    assert find_layers(_mlp(), [])[0] == []

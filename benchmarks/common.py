"""Shared pieces of the benchmarks: networks, interleaved timing, machine info, JSON output.

Timing rule (a 2-core machine shared with other jobs): contenders are compared side by side in
ONE process, interleaved round-robin in the same loop (each round runs a short block of steps of
every contender in turn), with warm-up steps excluded, and the per-step time of a contender is
the median over rounds. Ratios are ratios of those medians; the median of the per-round ratios
(paired, less sensitive to load that drifts during a run) is recorded beside them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

LAYER_TYPES = (nn.Linear, nn.Conv2d)


# ------------------------------------------------------------------------------ environment
def set_threads(threads: int) -> None:
    """``threads > 0``: use that many torch intra-op threads; 0 keeps torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Machine, versions and date, recorded in every JSON file."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "loadavg": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from importlib.metadata import version

        import posteriors  # noqa: F401

        info["posteriors"] = version("posteriors")
    except Exception:
        info["posteriors"] = None
    now = git_state()
    info["git"] = CODE_AT_IMPORT  # the code this process imported and measured
    if now != CODE_AT_IMPORT:
        info["git_now"] = now
    return info


def git_state() -> str | None:
    """``HEAD`` commit of the repository, ``+dirty`` if ``pyro_bnp/`` has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pyro_bnp"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


CODE_AT_IMPORT = git_state()


def bench_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """Return a parser with the shared options ``--out``, ``--quick`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    return parser


def report(result: Mapping[str, Any], out: str) -> None:
    """Print a benchmark's summary rows as aligned columns and write its JSON to ``out``."""
    rows = result["summary"]
    keys = [k for k in ("case", "value", "target", "status") if any(k in r for r in rows)]
    widths = {k: max(len(str(r.get(k, ""))) for r in rows) for k in keys}
    for r in rows:
        print("  ".join(f"{str(r.get(k, '')):<{widths[k]}}" for k in keys).rstrip())
    write_json(Path(out), result)
    print(f"wrote {out}")


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    """Write strict JSON: non-finite floats (n/a, not reached) become ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")


def _clean(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Tensor):
        return _clean(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


# ------------------------------------------------------------------------------ timing
def interleaved(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 20,
    block_s: float = 0.01,
    budget_s: float = 10.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    sync: Callable[[], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time ``contenders`` (each call = one step) round-robin; per-step medians in µs.

    Every contender first runs ``warmup`` untimed steps (at least one), which also calibrates
    its block length ``k`` (steps per round, so that a block lasts about ``block_s``). Then
    rounds run every contender's block in turn until ``budget_s`` seconds are spent (at least
    ``min_rounds`` rounds). Each round gives one per-step time per contender (block time / k).
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before each block's clock is read, so
    asynchronous device work is counted in its block.

    Returns
    -------
    dict
        ``name -> {"median_us", "q25_us", "q75_us", "rounds", "steps_per_round", "round_us"}``.
    """
    names = list(contenders)
    k: dict[str, int] = {}
    for name in names:
        fn = contenders[name]
        if sync is not None:
            sync()
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            fn()
        if sync is not None:
            sync()
        per = (time.perf_counter() - start) / max(1, warmup)
        k[name] = max(1, int(block_s / max(per, 1e-9)))
    times: dict[str, list[float]] = {n: [] for n in names}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (
        rounds < min_rounds or time.perf_counter() - start_all < budget_s
    ):
        for name in names:
            fn, steps = contenders[name], k[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            if sync is not None:
                sync()
            times[name].append((time.perf_counter() - t0) / steps * 1e6)
        rounds += 1
    out = {}
    for name in names:
        ts = times[name]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {
            "median_us": statistics.median(ts),
            "q25_us": q[0],
            "q75_us": q[2],
            "rounds": len(ts),
            "steps_per_round": k[name],
            "round_us": ts,
        }
    return out


def paired_ratio(timings: Mapping[str, Mapping[str, Any]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` (the rounds are interleaved, so they pair up)."""
    a, b = timings[num]["round_us"], timings[den]["round_us"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def ratio(timings: Mapping[str, Mapping[str, Any]], num: str, den: str) -> float:
    """Ratio of the per-step medians."""
    return timings[num]["median_us"] / timings[den]["median_us"]


def strip_rounds(timings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Drop the per-round lists (keep JSON files small)."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "round_us"} for k, v in timings.items()}


# ------------------------------------------------------------------------------ networks
def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Plain ``nn.Sequential`` MLP ``sizes[0] -> ... -> sizes[-1]``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """2 conv + linear on ``3 x 32 x 32``: conv(3->16) relu pool, conv(16->32) relu pool, fc."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, num_classes),
    )


class _Block(nn.Module):
    """``relu(GN(conv(relu(GN(conv(x))))) + shortcut(x))``, option-A shortcut (channel padding)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.gn1 = nn.GroupNorm(groups, c_out, affine=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.gn2 = nn.GroupNorm(groups, c_out, affine=False)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        if self.stride != 1 or self.pad:
            p = self.pad // 2
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, p, self.pad - p))
        return F.relu(out + x)


def resnet20(num_classes: int = 10, width: int = 16, groups: int = 8) -> nn.Sequential:
    """CIFAR ResNet-20 with parameter-free GroupNorm, as in ``examples/resnet.py``.

    3 stages of 3 basic blocks; every parameter is a conv or linear weight (all latent in
    :class:`BayesNet`), about 0.27 M of them.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, padding=1),
        nn.GroupNorm(groups, width, affine=False),
        nn.ReLU(),
    ]
    c_in = width
    for stage, c_out in enumerate([width, 2 * width, 4 * width]):
        for j in range(3):
            layers.append(_Block(c_in, c_out, 2 if stage > 0 and j == 0 else 1, groups))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class BayesNet(PyroModule):
    """A plain network turned into a Pyro model: ``N(0, prior_scale)`` priors on every weight.

    ``likelihood`` is ``"gaussian"`` (fixed noise ``sigma``, or a ``HalfNormal(1)`` latent
    ``sigma`` when ``sigma=None``) or ``"categorical"`` (logits). The weights are sampled
    before the data plate is entered (the pattern SGLD needs). ``subsample``: when set to an
    index tensor, the plate uses it (``pyro.plate(..., subsample=idx)``), which is how Pyro's
    own ``potential_fn`` is given a mini-batch; ``None`` lets the SGLD kernel inject indices.
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: str = "gaussian",
        sigma: float | None = 0.1,
        prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        net = copy.deepcopy(net)
        to_pyro_module_(net)
        self._layer_list: list[nn.Module] = []
        for m in net.modules():
            if isinstance(m, LAYER_TYPES):
                for pname in ("weight", "bias"):
                    p = getattr(m, pname)
                    prior = dist.Normal(0.0, prior_scale).expand(p.shape).to_event(p.dim())
                    setattr(m, pname, PyroSample(prior))
                self._layer_list.append(m)
        self.net = net
        self.likelihood = likelihood
        self.sigma = sigma
        self.subsample: Tensor | None = None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.likelihood == "gaussian" and self.sigma is None:
            sigma: Any = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
        else:
            sigma = self.sigma
        for m in self._layer_list:  # sample the weights outside the data plate
            m.weight, m.bias  # noqa: B018
        with pyro.plate("data", x.shape[0], subsample=self.subsample) as idx:
            out = self.net(x[idx])
            obs = None if y is None else y[idx]
            if self.likelihood == "gaussian":
                pyro.sample("obs", dist.Normal(out.squeeze(-1), sigma), obs=obs)
            else:
                pyro.sample("obs", dist.Categorical(logits=out), obs=obs)
        return out


def site_values(net: nn.Module, prefix: str = "net") -> dict[str, Tensor]:
    """Return the parameters of a plain network keyed as the sites of its :class:`BayesNet`."""
    return {f"{prefix}.{k}": v.detach().clone() for k, v in net.named_parameters()}


class Batches:
    """Mini-batch indices in shuffled epochs (``N // B`` batches per permutation)."""

    def __init__(self, n: int, b: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.n, self.b, self.device = n, b, device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.g, device=device)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.b > self.n:
            self.perm = torch.randperm(self.n, generator=self.g, device=self.device)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.b]
        self.pos += self.b
        return idx


def log_lik_sum(out: Tensor, y: Tensor, likelihood: str, sigma: float) -> Tensor:
    """Sum of the log likelihood of a mini-batch (constants dropped)."""
    if likelihood == "gaussian":
        return -0.5 * ((out.squeeze(-1) - y) / sigma).square().sum()
    return -F.cross_entropy(out, y, reduction="sum")


class HandSGLD:
    """A hand-written torch SGLD step on a plain ``nn.Module`` (the reference).

    One step: mini-batch indices, forward, ``U_hat = -(N/B) sum log p(y|x) + |theta|^2/2``,
    backward, then in place ``theta -= (eps/2) grad; theta += sqrt(eps) xi``. Indices and noise
    come from generators on the data's device.
    """

    def __init__(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor,
        batch: int,
        step_size: float,
        likelihood: str,
        sigma: float = 0.1,
        prior_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.net = net
        self.params = [p for p in net.parameters()]
        self.x, self.y = x, y
        self.batches = Batches(x.shape[0], batch, seed, device=x.device)
        self.scale = x.shape[0] / batch
        self.half = 0.5 * step_size
        self.noise = math.sqrt(step_size)
        self.likelihood, self.sigma = likelihood, sigma
        self.inv_var = 1.0 / prior_scale**2
        self.g = torch.Generator(device=x.device).manual_seed(seed + 1)

    def step(self) -> None:
        idx = self.batches.next()
        out = self.net(self.x[idx])
        ll = log_lik_sum(out, self.y[idx], self.likelihood, self.sigma)
        prior = sum(p.square().sum() for p in self.params)
        u = -self.scale * ll + 0.5 * self.inv_var * prior
        grads = torch.autograd.grad(u, self.params)
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                p.add_(g, alpha=-self.half)
                p.add_(torch.randn(p.shape, generator=self.g, device=p.device), alpha=self.noise)

    def full_gradient(self) -> None:
        """``grad U`` on all rows (what one gradient of full-data HMC/NUTS costs, minimum)."""
        out = self.net(self.x)
        ll = log_lik_sum(out, self.y, self.likelihood, self.sigma)
        prior = sum(p.square().sum() for p in self.params)
        torch.autograd.grad(-ll + 0.5 * self.inv_var * prior, self.params)


def fmt_us(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x >= 1e5:
        return f"{x / 1e3:,.0f} ms"
    return f"{x:,.0f} us"


def status(value: float, target: float, smaller_is_better: bool = True) -> str:
    if not math.isfinite(value):
        return "n/a"
    ok = value <= target if smaller_is_better else value >= target
    return "MET" if ok else "MISSED"

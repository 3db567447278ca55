"""Benchmark 5: peak RSS of a long SGLD run of a ~1e5-parameter network, one process per config.

A 784-128-10 ReLU MLP (101,770 parameters), categorical likelihood, 10,000 random rows of MNIST
shape, batch 128, BNP preconditioner, ``S`` updates (2,000; 20 with ``--quick``). Every
configuration runs in a fresh subprocess, which reports its own peak resident set size
(``VmHWM`` of ``/proc/self/status``, i.e. what ``ru_maxrss`` measures but for the child's own
address space; ``ru_maxrss`` is recorded too, see :func:`_peak_rss_mb`):

* ``baseline``: imports, data, model, ``kernel.setup`` and one update (the floor);
* ``mcmc_all``: ``pyro.infer.MCMC`` keeping every site of every draw (``S`` draws);
* ``mcmc_save_params``: the same with ``save_params`` = the output layer only (1,290 values);
* ``mcmc_save_params_mmap``: the same with ``MALLOC_MMAP_THRESHOLD_=131072`` in the child's
  environment (glibc then serves large temporaries with ``mmap``): separates what the kept draws
  cost from heap fragmentation (small long-lived draws pinning the heap between the large
  temporaries of each update);
* ``mcmc_thin10``: every site, ``thin=10`` (``S / 10`` draws from the same ``S`` updates);
* ``store``: the kernel loop streaming every site to disk with :class:`pyro_bnp.store.DrawStore`
  (flush every 100 draws), i.e. what :func:`pyro_bnp.store.sample_to_store` does.

``stored_mb`` is the size of the kept draws (float32); ``growth_mb`` is the peak RSS during the
run minus the RSS before it. ``MCMC.run`` keeps a list of the flat draws and then stacks it twice
(``torch.stack([torch.stack(l) for l in ...])``), so its peak holds three copies of the draws.

Run ``python benchmarks/bench_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    BayesNet,
    bench_parser,
    machine_info,
    mlp,
    num_params,
    report,
    set_threads,
)
from torch import nn

CONFIGS = (
    "baseline",
    "mcmc_all",
    "mcmc_save_params",
    "mcmc_save_params_mmap",
    "mcmc_thin10",
    "store",
)
# glibc: serve every allocation >= 128 KiB with mmap (no dynamic threshold), for the config above
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
SUBSET = ["net.2.bias", "net.2.weight"]
N_DATA = 10_000
BATCH = 128
STEP_SIZE = 1e-7


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MiB: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a child started from a large parent is at least the parent's RSS at the
    fork (Linux keeps the high-water mark of the replaced address space across ``exec``), so it
    overstates a small child; ``VmHWM`` belongs to the child's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(config: str, updates: int, threads: int) -> dict[str, Any]:
    """Run one configuration in this process and return its peak RSS and timings."""
    import pyro
    from pyro.infer import MCMC

    from pyro_bnp import SGLD

    set_threads(threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp([784, 128, 10], nn.ReLU)
    x = torch.rand(N_DATA, 784, generator=g)
    y = torch.randint(0, 10, (N_DATA,), generator=g)
    model = BayesNet(net, "categorical")
    thin = 10 if config == "mcmc_thin10" else 1
    kernel = SGLD(model, STEP_SIZE, subsample_size={"data": BATCH}, preconditioner="bnp", thin=thin)
    pyro.set_rng_seed(0)
    draws = updates // thin
    if config == "store":
        from pyro_bnp.store import DrawStore  # imports xarray/h5netcdf: count it before the run
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    kept = 0
    after_get: float | None = None
    if config == "baseline":
        kernel.setup(0, x, y)
        kernel.sample(kernel.initial_params)
        kernel.cleanup()
        draws = 0
    elif config.startswith("mcmc"):
        save = SUBSET if config.startswith("mcmc_save_params") else None
        mcmc = MCMC(
            kernel, num_samples=draws, warmup_steps=0, disable_progbar=True, save_params=save
        )
        mcmc.run(x, y)
        sizes = {k: v.numel() for k, v in kernel.initial_params.items()}
        kept = draws * sum(n for k, n in sizes.items() if save is None or k in save)
        elapsed = time.perf_counter() - start
        peak = _peak_rss_mb()
        mcmc.get_samples()
        after_get = _peak_rss_mb()
    elif config == "store":
        with tempfile.TemporaryDirectory() as d:
            store = DrawStore(d, every=100)
            kernel.setup(0, x, y)
            params = kernel.initial_params
            try:
                for i in range(draws):
                    params = kernel.sample(params)
                    store(kernel, params, "Sample", i)
            finally:
                store.flush()
                kernel.cleanup()
            on_disk = sum(p.stat().st_size for p in Path(d).iterdir())
    else:
        raise ValueError(config)
    if not config.startswith("mcmc"):
        elapsed = time.perf_counter() - start
        peak = _peak_rss_mb()
    out = {
        "config": config,
        "updates": 1 if config == "baseline" else updates,
        "draws": draws,
        "thin": thin,
        "num_params": num_params(net),
        "kept_values": kept,
        "stored_mb": kept * 4 / 2**20,
        "elapsed_s": elapsed,
        "us_per_update": elapsed / max(1, updates if config != "baseline" else 1) * 1e6,
        "rss_before_run_mb": rss_before,
        "peak_rss_mb": peak,
        "growth_mb": peak - rss_before,
        "peak_after_get_samples_mb": after_get,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if config == "store":
        out["on_disk_mb"] = on_disk / 2**20
    return out


def run(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    updates = 20 if quick else 2_000
    results = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--child", config, "--updates", str(updates)]
        cmd += ["--threads", str(threads)]
        env = {**os.environ, **MMAP_ENV} if config.endswith("_mmap") else None
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_memory child {config} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]["peak_rss_mb"]
    for r in results:
        r["over_baseline_mb"] = r["peak_rss_mb"] - base
    rows = []
    for r in results:
        value = f"peak RSS {r['peak_rss_mb']:,.0f} MB"
        if r["config"] != "baseline":
            value += f", run grew {r['growth_mb']:,.0f} MB for {r['draws']} draws"
            value += f" ({r['stored_mb']:,.1f} MB of values kept)"
            if r["peak_after_get_samples_mb"] is not None:
                value += f", {r['peak_after_get_samples_mb']:,.0f} MB after get_samples()"
        rows.append(
            {"bench": "memory", "case": r["config"], "value": value, "target": "", "status": ""}
        )
    set_threads(threads)
    return {
        "benchmark": "memory",
        "description": "peak RSS of a long SGLD run, 784-128-10 MLP (101,770 parameters)",
        "quick": quick,
        "machine": machine_info(),
        "updates": updates,
        "configs": results,
        "summary": rows,
    }


def main() -> None:
    parser = bench_parser(__doc__, "memory")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--updates", type=int, default=2_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.updates, args.threads)))
        return
    result = run(args.quick, args.threads)
    report(result, args.out)


if __name__ == "__main__":
    main()

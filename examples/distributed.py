"""BNP+RMSprop SGLD on several processes: one data-parallel chain, then one chain per rank.

Run with ``torchrun --nproc_per_node=2 examples/distributed.py [--quick] [--out DIR]`` (gloo on
the CPU; one torch thread per process). The model is the usual Pyro BNN of ``examples/bnn.py``;
nothing in it knows about the ranks.

1. **Data parallel** (``pyro_bnp.distributed.DataParallel``): the two ranks run ONE chain, each
   drawing ``--batch`` rows per update from its half of the data; an all-reduce combines the
   gradients and BNP's layer statistics, so the chain equals a one-process chain with twice the
   batch. Rank 0 streams the draws to ``DIR/store`` and checkpoints it: kill a rank (or the
   whole run) and start the same command again, and it continues from the last checkpoint
   (``torchrun --max-restarts=3`` does that by itself).
2. **Parallel chains** (``pyro_bnp.distributed.run_chains``): one chain per rank, each streamed
   to its own store ``DIR/chains/chain-<rank>``, gathered on rank 0 into one DataTree with a
   ``chain`` dimension (R-hat across ranks).

Rank 0 writes ``DIR/data_parallel.nc`` and ``DIR/chains.nc`` (the DataTrees as netCDF) and
``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import arviz_stats as azs
import numpy as np
import pyro
import torch
from bnn import BNN, make_data

import pyro_bnp
from pyro_bnp import distributed
from pyro_bnp.store import load_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="distributed_out", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a run of a minute or two")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50, help="rows per rank and update")
    parser.add_argument("--step-size", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.warmup = 200, 200
    torch.set_num_threads(1)
    rank, world = distributed.init_process_group(timeout_s=60.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(args.seed)  # only rank 0's global seed matters: it seeds the chains
    x, y = make_data(1000, seed=0)

    # 1. one chain, data parallel
    kernel = pyro_bnp.SGLD(
        BNN(d_in=1, hidden=32),
        step_size=args.step_size,
        subsample_size={"data": args.batch},
        preconditioner="bnp+rmsprop",
    )
    start = time.perf_counter()
    distributed.sample_to_store(
        distributed.DataParallel(kernel),
        out / "store",
        x,
        y,
        num_samples=args.num_samples,
        warmup_steps=args.warmup,
        every=100,
        load=False,  # read back below: rank-0-only work between collectives would stall them
    )
    dp_seconds = time.perf_counter() - start

    # 2. one chain per rank
    start = time.perf_counter()
    chains = distributed.run_chains(
        pyro_bnp.SGLD(
            BNN(d_in=1, hidden=32),
            step_size=args.step_size,
            subsample_size={"data": 2 * args.batch},
            preconditioner="bnp+rmsprop",
        ),
        x,
        y,
        num_samples=args.num_samples,
        warmup_steps=args.warmup,
        directory=out / "chains",
        every=100,
    )
    chain_seconds = time.perf_counter() - start
    if rank != 0:
        return
    tree = load_store(out / "store", model=kernel.model, model_args=(x, y))
    tree.to_netcdf(out / "data_parallel.nc")
    chains.to_netcdf(out / "chains.nc")
    rhat = azs.rhat(chains["posterior"].to_dataset())
    max_rhat = float(max(np.nanmax(rhat[k].values) for k in rhat.data_vars))
    summary = {
        "world_size": world,
        "data_parallel": {
            "updates": args.num_samples + args.warmup,
            "rows_per_update": world * args.batch,
            "seconds": round(dp_seconds, 2),
            "sigma_mean": float(tree["posterior"]["sigma"].mean()),
        },
        "chains": {"chains": world, "seconds": round(chain_seconds, 2)},
        "max_rhat": max_rhat,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'data_parallel.nc'}, {out / 'chains.nc'} and {out / 'summary.json'}")


if __name__ == "__main__":
    main()

"""Data-parallel SGLD throughput: updates/s of the 784-400-400-10 MLP on 1 and 2 ranks.

``pyro_bnp.distributed.DataParallel`` with gloo on this machine's CPU cores, one torch thread per
rank (the script starts the rank processes itself; no torchrun needed). Cases, per
preconditioner (identity, BNP):

* ``1 rank, B=128``: the one-process kernel (``DataParallel`` is not involved);
* ``2 ranks, B=64 each``: the same chain (128 rows per update) split over two processes;
* ``1 rank, B=64``: what each rank computes, without communication.

Also measured on 2 ranks: the all-reduce of the model's gradient buffer alone (float32, the
cost model's ``S``) and of a 16-entry buffer (the latency ``alpha``). Random data of MNIST
shape; categorical likelihood; N(0, 1) priors. ``docs/distributed.md`` reads the numbers.
Run ``python benchmarks/bench_distributed.py [--quick]``; writes
``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import BayesNet, bench_parser, machine_info, mlp, report, set_threads
from torch import nn

HERE = Path(__file__).resolve().parent
N_ROWS = 6000


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(world: int, pre: str, batch: int, steps: int, out: Path, threads: int) -> None:
    port = _port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
        cmd = [sys.executable, __file__, "--worker", pre, str(batch), str(steps), str(out)]
        cmd += ["--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=HERE))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"a rank of the {world}-rank case exited with {p.returncode}")


def _worker(pre: str, batch: int, steps: int, out: Path) -> None:
    import pyro

    import pyro_bnp
    from pyro_bnp import distributed

    rank, world = distributed.init_process_group("gloo", timeout_s=300.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ROWS, 784, generator=g)
    y = torch.randint(0, 10, (N_ROWS,), generator=g)
    pyro.set_rng_seed(0)
    model = BayesNet(mlp([784, 400, 400, 10], nn.ReLU), likelihood="categorical")
    kernel: Any = pyro_bnp.SGLD(
        model, step_size=1e-6, subsample_size={"data": batch}, preconditioner=pre, health=None
    )
    if world > 1:
        kernel = distributed.DataParallel(kernel, check_every=None)
    kernel.setup(0, x, y)
    params = kernel.initial_params
    for _ in range(5):  # warm-up (the first call evaluates the initial point, installs hooks)
        params = kernel.sample(params)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        params = kernel.sample(params)
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": elapsed, "updates": steps}
    if world > 1:
        size = sum(v.numel() for v in params.values())
        result["params"] = size
        for name, n in (("allreduce_grad_s", size), ("allreduce_small_s", 16)):
            buf = torch.ones(n)
            for _ in range(3):
                torch.distributed.all_reduce(buf)
            reps = max(steps // 2, 5)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.distributed.all_reduce(buf)
            result[name] = (time.perf_counter() - t0) / reps
    if rank == 0:
        out.write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = bench_parser(__doc__, "distributed")
    parser.add_argument("--worker", nargs=4, help=argparse_hidden())
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        pre, batch, steps, out = args.worker
        _worker(pre, int(batch), int(steps), Path(out))
        return
    steps = 10 if args.quick else 150
    threads = max(args.threads, 1)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for pre in ("identity", "bnp"):
            for world, batch in ((1, 128), (2, 64), (1, 64)):
                path = Path(tmp) / f"{pre}-{world}-{batch}.json"
                print(f"{pre}: {world} rank(s), B={batch} per rank ...", flush=True)
                _launch(world, pre, batch, steps, path, threads)
                r = json.loads(path.read_text())
                r.update(
                    preconditioner=pre,
                    ranks=world,
                    batch_per_rank=batch,
                    updates_per_s=r["updates"] / r["seconds"],
                )
                cases.append(r)
    summary = []
    for pre in ("identity", "bnp"):
        rows = {(c["ranks"], c["batch_per_rank"]): c for c in cases if c["preconditioner"] == pre}
        one, two = rows[(1, 128)], rows[(2, 64)]
        for (world, b), c in sorted(rows.items()):
            summary.append(
                {
                    "case": f"{pre}: {world} rank(s) x B={b} ({world * b} rows/update)",
                    "value": f"{c['updates_per_s']:.1f} updates/s",
                }
            )
        speedup = two["updates_per_s"] / one["updates_per_s"]
        summary.append(
            {"case": f"{pre}: speed-up 2 ranks / 1 rank at 128 rows", "value": f"{speedup:.2f}x"}
        )
        comm = two.get("allreduce_grad_s", float("nan"))
        summary.append(
            {
                "case": f"{pre}: all-reduce of the {two.get('params', 0)} gradients (float32)",
                "value": f"{comm * 1e3:.2f} ms "
                f"({comm * two['updates_per_s'] * 100:.0f}% of a 2-rank update)",
            }
        )
        summary.append(
            {
                "case": f"{pre}: 16-value all-reduce (latency)",
                "value": f"{two.get('allreduce_small_s', float('nan')) * 1e6:.0f} us",
            }
        )
    result = {
        "benchmark": "distributed",
        "machine": machine_info(),
        "threads_per_rank": threads,
        "updates_timed": steps,
        "cases": cases,
        "summary": summary,
    }
    report(result, args.out)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

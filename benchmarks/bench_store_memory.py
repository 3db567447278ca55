"""Peak memory of a long streamed run (pyro_bnp.store) against pyro's MCMC, which keeps draws.

Each configuration runs in its own subprocess; the peak resident set size (ru_maxrss) is read
there. Prints a table and writes JSON (``--out``, default benchmarks/results/store_memory.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import resource, sys, time, tempfile
import torch, pyro, pyro.distributions as dist
from pyro.nn import PyroModule, PyroSample
from torch import nn
from pyro.infer import MCMC
from pyro_bnp import SGLD
from pyro_bnp.store import sample_to_store

torch.set_num_threads(1)
mode, n = sys.argv[1], int(sys.argv[2])

class Net(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](20, 100)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 0.3).expand([100, 20]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([100]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](100, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 0.1).expand([1, 100]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y):
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y[idx])

pyro.set_rng_seed(0)
x = torch.randn(2000, 20); y = torch.randn(2000)
kernel = SGLD(Net(), step_size=1e-5, subsample_size={"data": 64}, preconditioner="bnp")
t = time.perf_counter()
if mode == "store":
    with tempfile.TemporaryDirectory() as d:
        sample_to_store(kernel, d, x, y, num_samples=n, every=500, progress=False, load=False)
else:
    MCMC(kernel, num_samples=n, warmup_steps=0, disable_progbar=True).run(x, y)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sizes", default="2000,8000,24000")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [200, 800] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    for mode in ("store", "mcmc"):
        for n in sizes:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(n)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rss_kb, seconds = out.stdout.split()[-2:]
            rows.append({"mode": mode, "draws": n, "peak_rss_mb": int(rss_kb) / 1024,
                         "seconds": float(seconds)})  # fmt: skip
            print(f"{mode:6s} {n:7d} draws: peak RSS {int(rss_kb) / 1024:8.1f} MB "
                  f"({float(seconds):.1f} s)")  # fmt: skip
    result = {
        "benchmark": "store_memory",
        "network": "20-100-1 MLP, 2201 parameters, BNP, batch 64, every=500",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "store_memory.json").write_text(json.dumps(result, indent=2))
    _ = tempfile  # the child uses a temporary store


if __name__ == "__main__":
    main()

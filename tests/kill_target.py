"""Run a long streamed chain until killed (used by test_reliability's kill test)."""

from __future__ import annotations

import sys

import pyro
import torch
from reliability_models import data, make_kernel

from pyro_bnp.store import sample_to_store

if __name__ == "__main__":
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    x, y = data()
    sample_to_store(
        make_kernel(),
        sys.argv[1],
        x,
        y,
        num_samples=10**7,
        warmup_steps=20,
        every=10,
        progress=False,
    )

"""The public seams the tests use to look inside a kernel (docs/design.md, "Tests").

``kernel.potential`` (the model's mini-batch log density), ``kernel.chain`` (the chain state),
``kernel.layers`` / ``kernel.hooks`` (BNP's layer statistics). Nothing here reads a private
attribute.
"""

from __future__ import annotations

from typing import Any

import torch


def evaluate(kernel: Any, z: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The potential at ``z`` on the chain's next mini-batch, as one update evaluates it."""
    pot, chain = kernel.potential, kernel.chain
    indices = pot.next_indices(chain.perms, chain.pos, chain.rng)
    return pot(z, indices, hooks=kernel.hooks)


class WrappedPotential:
    """A potential that counts its calls and can replace the log density by NaN."""

    def __init__(self, potential: Any, fail: bool = False) -> None:
        self.potential = potential
        self.fail = fail
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.potential, name)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[float, dict[str, torch.Tensor]]:
        self.calls += 1
        lp, grads = self.potential(*args, **kwargs)  # the hooks observe this forward pass
        return (float("nan") if self.fail else lp), grads

"""The samplers the examples compare, with their names in plots and tables.

Imported by the example scripts as ``_common`` (their own folder is on ``sys.path`` when they
run as ``python examples/NAME.py``), as ``bandit.py`` imports ``_bandit_problems``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro_bnp
from pyro_bnp.names import make_preconditioner

# the preconditioners of pyro_bnp.SGLD: SGLD, pSGLD, BNP-SGLD and BNP + RMSprop
METHODS = ["identity", "rmsprop", "bnp", "bnp+rmsprop"]
LABELS = {
    "identity": "SGLD",
    "rmsprop": "pSGLD",
    "bnp": "BNP-SGLD",
    "bnp+rmsprop": "BNP+RMSprop",
    "sghmc": "SGHMC",
    "bnp-sghmc": "BNP-SGHMC",
}
COLORS = {
    "identity": "C0",
    "rmsprop": "C1",
    "bnp": "C2",
    "bnp+rmsprop": "C3",
    "sghmc": "C9",
    "bnp-sghmc": "C6",
}

# pyro_bnp.SGHMC rows (issue 15): method name -> the preconditioner of the SGLD row it pairs with
# (plain SGHMC with SGLD's identity, BNP-SGHMC with BNP-SGLD's plain BNP)
SGHMC_METHODS = {"sghmc": "identity", "bnp-sghmc": "bnp"}
# The friction is fixed, not piloted: h * alpha = 0.1, i.e. the momentum keeps 90% of itself per
# update (the usual heavy-ball momentum 0.9). A pilot over it as well would double every pilot's
# cost. SGHMC's step size in the examples is given as ``eps``, the SGLD step size of the same
# linear stability (``pyro_bnp.SGHMC``: ``eps = 2 h^2 / (2 - h alpha)``; its Gaussian variance
# law has the denominator ``1 - eps p / (4 sigma^2)``, SGLD's), so SGHMC is piloted on the grid
# of its SGLD row (in the same units), plus one smaller value where a script says so: the
# momentum accumulates mini-batch gradient noise over about ``1 / (h alpha)`` updates.
MOMENTUM_DECAY = 0.1

# Opt-in BNP variants that some examples run beside the four samplers; every name is one of
# pyro_bnp.names.PRECONDITIONERS (the package's one name table)
EXTRA_PRECONDITIONERS = ("bnp-others", "bnp-cap")  # RMSprop on the sites outside layers; the cap


def preconditioner(name: str) -> Any:
    """``SGLD``'s ``preconditioner=`` for a method name: a fresh object from the name table."""
    return make_preconditioner(name)


def is_sghmc(method: str) -> bool:
    """Whether ``method`` is one of the SGHMC rows (``SGHMC_METHODS``)."""
    return method in SGHMC_METHODS


def sghmc_step(eps: float, decay: float = MOMENTUM_DECAY) -> tuple[float, float]:
    """``(h, friction)`` of the SGHMC update whose linear stability is SGLD's at ``eps``.

    Solves ``eps = 2 h^2 / (2 - h alpha)`` with ``h alpha = decay``:
    ``h = sqrt(eps (2 - decay) / 2)``, ``alpha = decay / h``.
    """
    h = math.sqrt(eps * (2.0 - decay) / 2.0)
    return h, decay / h


def make_kernel(
    method: str,
    model: Callable[..., Any],
    eps: float,
    pre: Any = None,
    **kwargs: Any,
) -> pyro_bnp.SGLD | pyro_bnp.SGHMC:
    """Return the kernel of a method at the (SGLD-equivalent) step size ``eps``.

    SGLD rows: ``SGLD(model, eps, preconditioner=pre or the name's)``. SGHMC rows:
    ``SGHMC(model, h, friction=alpha)`` with ``(h, alpha) = sghmc_step(eps)`` and the
    preconditioner of ``SGHMC_METHODS`` (or ``pre``). Other keyword arguments go to the kernel.
    """
    if is_sghmc(method):
        h, alpha = sghmc_step(eps)
        p = pre if pre is not None else preconditioner(SGHMC_METHODS[method])
        return pyro_bnp.SGHMC(model, step_size=h, friction=alpha, preconditioner=p, **kwargs)
    p = pre if pre is not None else preconditioner(method)
    return pyro_bnp.SGLD(model, step_size=eps, preconditioner=p, **kwargs)

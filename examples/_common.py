"""The four samplers the examples compare, with their names in plots and tables.

Imported by the example scripts as ``_common`` (their own folder is on ``sys.path`` when they
run as ``python examples/NAME.py``), as ``bandit.py`` imports ``_bandit_problems``.
"""

from __future__ import annotations

from typing import Any

import pyro_bnp

# the preconditioners of pyro_bnp.SGLD: SGLD, pSGLD, BNP-SGLD and BNP + RMSprop
METHODS = ["identity", "rmsprop", "bnp", "bnp+rmsprop"]
LABELS = {
    "identity": "SGLD",
    "rmsprop": "pSGLD",
    "bnp": "BNP-SGLD",
    "bnp+rmsprop": "BNP+RMSprop",
}
COLORS = {
    "identity": "C0",
    "rmsprop": "C1",
    "bnp": "C2",
    "bnp+rmsprop": "C3",
}

# Opt-in BNP variants that some examples run beside the four samplers (a fresh object per chain)
EXTRA_PRECONDITIONERS = {
    "bnp-others": lambda: pyro_bnp.BNP(others="rmsprop"),  # RMSprop on the sites outside layers
    "bnp-cap": lambda: pyro_bnp.BNP(prior_cap=1.0),  # the prior cap
}


def preconditioner(name: str) -> Any:
    """``SGLD``'s ``preconditioner=`` for a method name: one of ``METHODS`` or of the extras."""
    return EXTRA_PRECONDITIONERS[name]() if name in EXTRA_PRECONDITIONERS else name

"""The four samplers the examples compare, with their names in plots and tables.

Imported by the example scripts as ``_common`` (their own folder is on ``sys.path`` when they
run as ``python examples/NAME.py``), as ``bandit.py`` imports ``_bandit_problems``.
"""

from __future__ import annotations

from typing import Any

from pyro_bnp.names import make_preconditioner

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

# Opt-in BNP variants that some examples run beside the four samplers; every name is one of
# pyro_bnp.names.PRECONDITIONERS (the package's one name table)
EXTRA_PRECONDITIONERS = ("bnp-others", "bnp-cap")  # RMSprop on the sites outside layers; the cap


def preconditioner(name: str) -> Any:
    """``SGLD``'s ``preconditioner=`` for a method name: a fresh object from the name table."""
    return make_preconditioner(name)

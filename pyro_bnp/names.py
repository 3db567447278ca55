"""The one table of preconditioner names (``SGLD(preconditioner="...")``, examples, benchmarks).

Every name maps to a factory that makes a fresh object, so two kernels never share state.
:func:`register_preconditioner` adds a name (a new preconditioner is one small class plus one
line here, or one call from user code).
"""

from __future__ import annotations

from collections.abc import Callable

from pyro_bnp.bnp import BNP
from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop

__all__ = ["PRECONDITIONERS", "make_preconditioner", "register_preconditioner"]

#: name -> factory of a fresh preconditioner
PRECONDITIONERS: dict[str, Callable[[], Preconditioner]] = {
    "identity": Identity,  # plain SGLD
    "rmsprop": RMSprop,  # pSGLD
    "bnp": BNP,  # the paper's BNP
    "bnp+rmsprop": lambda: BNP(rmsprop=RMSprop()),  # RMSprop in BNP coordinates
    "bnp-others": lambda: BNP(others="rmsprop"),  # plain BNP on layers, RMSprop elsewhere
    "bnp-cap": lambda: BNP(prior_cap=1.0),  # plain BNP with the prior cap
    "bnp-frozen": lambda: BNP(freeze_after_warmup=True),  # M constant after warmup
}


def register_preconditioner(name: str, factory: Callable[[], Preconditioner]) -> None:
    """Make ``preconditioner=name`` build ``factory()``.

    Raises
    ------
    ValueError
        If ``name`` is not a non-empty string, is taken, or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_preconditioner: name must be a non-empty str, got {name!r}")
    if name in PRECONDITIONERS:
        raise ValueError(f"register_preconditioner: {name!r} is already registered")
    if not callable(factory):
        raise ValueError(f"register_preconditioner: factory must be callable, got {factory!r}")
    PRECONDITIONERS[name] = factory


def make_preconditioner(spec: str | Preconditioner) -> Preconditioner:
    """Return ``spec`` if it is a :class:`Preconditioner`, else a fresh one of that name.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if isinstance(spec, Preconditioner):
        return spec
    factory = PRECONDITIONERS.get(spec) if isinstance(spec, str) else None
    if factory is None:
        names = ", ".join(repr(n) for n in PRECONDITIONERS)
        raise ValueError(
            f"preconditioner must be {names} or a pyro_bnp.Preconditioner instance, got {spec!r}"
        )
    return factory()

"""Step size schedules: plain callables ``step -> float`` (pure Python, no pyro).

``step`` counts SGLD updates from 0 over warmup and sampling together (with ``thin=k`` a draw
takes ``k`` updates). Any callable with that signature works as the kernel's ``step_size``; the
classes here are small, picklable and print their settings.
"""

from __future__ import annotations

import math

__all__ = ["Constant", "Cyclical", "Polynomial", "constant", "cyclical", "polynomial"]


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0) or not math.isfinite(value):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


class Constant:
    """A constant step size ``eps_t = step_size``.

    Parameters
    ----------
    step_size : float
        The step size, positive and finite.
    """

    def __init__(self, step_size: float) -> None:
        self.step_size = _positive("step_size", step_size)

    def __call__(self, step: int) -> float:
        """Return the step size at update ``step``."""
        return self.step_size

    def __repr__(self) -> str:
        return f"Constant(step_size={self.step_size!r})"


class Polynomial:
    r"""Polynomial decay ``eps_t = a (b + t)^(-gamma)`` (Welling & Teh 2011).

    With ``gamma`` in ``(0.5, 1]`` the sum of steps diverges and the sum of squares converges,
    the Robbins-Monro conditions under which SGLD converges without a Metropolis correction.

    Parameters
    ----------
    a : float
        Scale, positive.
    b : float
        Offset, positive (``eps_0 = a b^-gamma``).
    gamma : float
        Decay exponent in ``(0.5, 1]``.
    """

    def __init__(self, a: float, b: float = 1.0, gamma: float = 0.55) -> None:
        self.a = _positive("a", a)
        self.b = _positive("b", b)
        gamma = float(gamma)
        if not (0.5 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0.5, 1], got {gamma!r}")
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        """Return ``a (b + step)^(-gamma)``."""
        return self.a * (self.b + step) ** (-self.gamma)

    def __repr__(self) -> str:
        return f"Polynomial(a={self.a!r}, b={self.b!r}, gamma={self.gamma!r})"


class Cyclical:
    r"""Cyclical cosine schedule of cSGLD (Zhang, Li, Zhang, Chen, Wilson 2020).

    .. math::

        \epsilon_k = \frac{\epsilon_0}{2}\left[\cos\left(\frac{\pi\,\mathrm{mod}(k-1,
            \lceil K/C \rceil)}{\lceil K/C \rceil}\right) + 1\right], \quad k = t + 1

    Parameters
    ----------
    step_size : float
        ``eps_0``, the largest step size (at the start of each cycle).
    num_steps : int
        ``K``, the total number of updates (warmup and sampling, times ``thin``).
    num_cycles : int
        ``C``, the number of cycles.
    """

    def __init__(self, step_size: float, num_steps: int, num_cycles: int = 4) -> None:
        self.step_size = _positive("step_size", step_size)
        if int(num_steps) < 1 or int(num_cycles) < 1 or int(num_cycles) > int(num_steps):
            raise ValueError(
                f"need 1 <= num_cycles <= num_steps, got num_steps={num_steps!r}, "
                f"num_cycles={num_cycles!r}"
            )
        self.num_steps = int(num_steps)
        self.num_cycles = int(num_cycles)
        self.cycle_length = math.ceil(self.num_steps / self.num_cycles)

    def __call__(self, step: int) -> float:
        """Return the step size at update ``step`` (0-based)."""
        phase = (step % self.cycle_length) / self.cycle_length
        return 0.5 * self.step_size * (math.cos(math.pi * phase) + 1.0)

    def __repr__(self) -> str:
        return (
            f"Cyclical(step_size={self.step_size!r}, num_steps={self.num_steps!r}, "
            f"num_cycles={self.num_cycles!r})"
        )


def constant(step_size: float) -> Constant:
    """Return a :class:`Constant` schedule."""
    return Constant(step_size)


def polynomial(a: float, b: float = 1.0, gamma: float = 0.55) -> Polynomial:
    """Return a :class:`Polynomial` schedule ``a (b + t)^(-gamma)``."""
    return Polynomial(a, b, gamma)


def cyclical(step_size: float, num_steps: int, num_cycles: int = 4) -> Cyclical:
    """Return a :class:`Cyclical` schedule."""
    return Cyclical(step_size, num_steps, num_cycles)

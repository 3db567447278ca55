"""The two contextual bandits of ``bandit.py``: rewards, expected rewards and regret.

Both follow Riquelme, Tucker & Snoek, "Deep Bayesian Bandits Showdown" (ICLR 2018).

**Mushroom.** A context is one mushroom of the UCI data set (127 one-hot features). Two
actions: 0 = do not eat (reward 0), 1 = eat: +5 for an edible mushroom; for a poisonous one
+5 or -35 with probability 1/2 each (expected -15). The optimal policy eats exactly the edible
mushrooms. Contexts are drawn uniformly with replacement from the 8124 mushrooms.

**Wheel** (exploration parameter ``delta`` in (0, 1)). Contexts ``X`` are uniform in the unit
disc of R^2; 5 actions. Action 0 (the paper's ``a_1``) always pays ``N(mu_1, sigma^2)`` with
``mu_1 = 1.2``. Inside the disc of radius ``delta`` (``||X|| <= delta``) actions 1-4 pay
``N(mu_2, sigma^2)`` with ``mu_2 = 1.0`` (so action 0 is optimal). Outside it
(``||X|| > delta``) the one action among 1-4 that matches the quadrant of ``X`` pays
``N(mu_3, sigma^2)`` with ``mu_3 = 50`` (optimal) and the three others pay ``N(mu_2, sigma^2)``;
``sigma = 0.01``. Our quadrant numbering: action 1 for ``x >= 0, y >= 0``, 2 for
``x >= 0, y < 0``, 3 for ``x < 0, y >= 0``, 4 for ``x < 0, y < 0`` (any fixed bijection gives
the same problem). The larger ``delta``, the rarer (``1 - delta^2`` of the contexts) and the
harder to find the high rewards; a policy that always plays action 0 has expected regret
``48.8 (1 - delta^2)`` per round.

**Regret** of a chosen action is the *expected* reward of the optimal action minus the
expected reward of the chosen one (eating a poisonous mushroom counts -15, not the realised
+5 or -35). Each ``draw`` also returns a realised reward for *every* action, so that every
policy run with the same seed meets the same contexts and the same reward noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MUSHROOM_FILES = ("agaricus.txt.train", "agaricus.txt.test")
N_FEATURES = 127

EAT_EDIBLE, EAT_POISON_GOOD, EAT_POISON_BAD, NOT_EAT = 5.0, 5.0, -35.0, 0.0
WHEEL_MU1, WHEEL_MU2, WHEEL_MU3, WHEEL_SIGMA = 1.2, 1.0, 50.0, 0.01


@dataclass
class Rounds:
    """``n`` rounds of a bandit, drawn up front.

    Attributes
    ----------
    contexts : ndarray, shape (n, d), float32
    means : ndarray, shape (n, K)
        Expected reward of every action.
    rewards : ndarray, shape (n, K)
        A realised reward of every action (a policy observes only the one it plays).
    """

    contexts: np.ndarray
    means: np.ndarray
    rewards: np.ndarray


def regret(means: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Per-round regret: best expected reward minus the chosen action's expected reward."""
    actions = np.asarray(actions, dtype=np.int64)
    return means.max(axis=1) - means[np.arange(len(actions)), actions]


def mushroom_dir(data_dir: str | Path) -> Path:
    """Return the directory of the svmlight files: ``data_dir`` or ``data_dir/mushroom``."""
    data_dir = Path(data_dir)
    if (data_dir / MUSHROOM_FILES[0]).exists():
        return data_dir
    return data_dir / "mushroom"


def load_mushroom(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All 8124 mushrooms: one-hot features ``[8124, 127]`` (float32) and ``poisonous`` (bool)."""
    from sklearn.datasets import load_svmlight_files

    d = mushroom_dir(data_dir)
    paths = [str(d / f) for f in MUSHROOM_FILES]
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"mushroom data not found: {p} (pass --data-dir)")
    x_tr, y_tr, x_te, y_te = load_svmlight_files(paths, n_features=N_FEATURES)
    x = np.vstack([x_tr.toarray(), x_te.toarray()]).astype(np.float32)
    poisonous = np.concatenate([y_tr, y_te]) == 1
    return x, poisonous


def mushroom_means(poisonous: np.ndarray) -> np.ndarray:
    """Return the expected rewards ``[n, 2]`` (not eat, eat) of mushrooms with these labels."""
    eat = np.where(poisonous, 0.5 * (EAT_POISON_GOOD + EAT_POISON_BAD), EAT_EDIBLE)
    return np.stack([np.full_like(eat, NOT_EAT), eat], axis=1)


def mushroom_rounds(
    x: np.ndarray, poisonous: np.ndarray, n: int, rng: np.random.Generator
) -> Rounds:
    """``n`` mushroom rounds, contexts drawn uniformly with replacement."""
    idx = rng.integers(0, len(x), size=n)
    pois = poisonous[idx]
    lucky = rng.random(n) < 0.5
    eat = np.where(pois, np.where(lucky, EAT_POISON_GOOD, EAT_POISON_BAD), EAT_EDIBLE)
    rewards = np.stack([np.full(n, NOT_EAT), eat], axis=1)
    return Rounds(x[idx], mushroom_means(pois), rewards)


def wheel_means(contexts: np.ndarray, delta: float) -> np.ndarray:
    """Return the expected rewards ``[n, 5]`` of the wheel bandit at the given contexts."""
    n = len(contexts)
    means = np.full((n, 5), WHEEL_MU2)
    means[:, 0] = WHEEL_MU1
    outside = np.linalg.norm(contexts, axis=1) > delta
    x, y = contexts[:, 0], contexts[:, 1]
    quadrant = 1 + 2 * (x < 0) + (y < 0)  # 1: ++, 2: +-, 3: -+, 4: --
    rows = np.flatnonzero(outside)
    means[rows, quadrant[rows]] = WHEEL_MU3
    return means


def wheel_rounds(n: int, delta: float, rng: np.random.Generator) -> Rounds:
    """``n`` wheel rounds: contexts uniform in the unit disc, Gaussian rewards."""
    radius = np.sqrt(rng.random(n))
    angle = 2.0 * np.pi * rng.random(n)
    contexts = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    means = wheel_means(contexts, delta)
    rewards = means + WHEEL_SIGMA * rng.standard_normal(means.shape)
    return Rounds(contexts.astype(np.float32), means, rewards)

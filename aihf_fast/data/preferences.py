"""Synthetic preference labels: a Bradley-Terry draw on true returns, as PEBBLE and imitation's
synthetic gatherer make them. One implementation for the LLM task and for control segments."""
from __future__ import annotations

import numpy as np


def bradley_terry_labels(returns_1, returns_2, rng: np.random.Generator, temperature: float = 1.0,
                         label_noise: float = 0.0):
    """Which of two items a simulated rater prefers, given their true returns (n,) each.

    The first is preferred with probability sigmoid((r_1 - r_2) / temperature) (``temperature=0``:
    the higher return, a fair coin on ties); the label is then flipped with probability
    ``label_noise``. Consumes ``rng`` with one ``rng.random((n, 2))`` call whatever the options.
    Returns ``(first_preferred, p_first)``: bool (n,) and float64 (n,), the probability of
    ``first_preferred`` under this whole process.
    """
    if not temperature >= 0 or not 0 <= label_noise <= 1:
        raise ValueError(f"need temperature >= 0 and 0 <= label_noise <= 1, got {temperature}, {label_noise}")
    r1 = np.atleast_1d(np.asarray(returns_1, dtype=np.float64))
    r2 = np.atleast_1d(np.asarray(returns_2, dtype=np.float64))
    if r1.shape != r2.shape or r1.ndim != 1:
        raise ValueError(f"returns_1 and returns_2 must be (n,) each, got {r1.shape} and {r2.shape}")
    if not (np.isfinite(r1).all() and np.isfinite(r2).all()):
        raise ValueError("returns must be finite")
    diff = r1 - r2
    if temperature == 0:
        p_bt = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    else:
        p_bt = 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))  # sigmoid, without overflow
    u = rng.random((len(diff), 2))
    first = (u[:, 0] < p_bt) ^ (u[:, 1] < label_noise)
    return first, (1 - label_noise) * p_bt + label_noise * (1 - p_bt)

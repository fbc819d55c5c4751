"""Summary statistics of iteration times.

The median is the headline number (robust to the odd slow iteration a phone's thermal or
scheduler state produces); p90 shows the tail, min the best case, mean the average cost.

>>> summarize([10.0, 12.0, 11.0, 30.0])
{'n': 4, 'median_ms': 11.5, 'p90_ms': 24.6, 'min_ms': 10.0, 'max_ms': 30.0, 'mean_ms': 15.75, \
'std_ms': 8.258}
"""
from __future__ import annotations

from typing import Sequence


def summarize(times_ms: Sequence[float]) -> dict:
    """n, median, p90, min, max, mean, std (ms, 3-decimal rounding) of ``times_ms``.

    An empty sequence gives ``n = 0`` and ``None`` everywhere (a run that timed out before
    its first timed iteration), never a made-up number.
    """
    import numpy as np

    keys = ("median_ms", "p90_ms", "min_ms", "max_ms", "mean_ms", "std_ms")
    if len(times_ms) == 0:
        return {"n": 0, **{k: None for k in keys}}
    t = np.asarray(times_ms, dtype=np.float64)
    values = (np.percentile(t, 50), np.percentile(t, 90), t.min(), t.max(), t.mean(), t.std())
    return {"n": int(t.size), **{k: round(float(v), 3) for k, v in zip(keys, values)}}

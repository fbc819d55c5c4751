"""The inputs a device-side runner feeds an artifact: random arrays of the manifest's shapes.

No torch here: the runner times ONNX files without it.
"""
from __future__ import annotations

import json
from pathlib import Path


def make_inputs(spec: list[dict], seed: int = 0) -> dict:
    """Random numpy arrays of the manifest's shapes and dtypes (ints in [low, high))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for entry in spec:
        shape, dtype = tuple(int(d) for d in entry["shape"]), np.dtype(entry["dtype"])
        if dtype.kind == "f":
            arrays[entry["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            # Small ids fit every vocabulary, tiny test models' included.
            low, high = int(entry.get("low", 0)), int(entry.get("high", 100))
            arrays[entry["name"]] = rng.integers(low, high, size=shape).astype(dtype)
        else:
            arrays[entry["name"]] = np.zeros(shape, dtype=dtype)
    return arrays


def load_inputs_arg(value: str) -> list[dict]:
    """``--inputs`` value: inline JSON, or ``@path`` to a JSON file."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    spec = json.loads(text)
    if not isinstance(spec, list) or not all(isinstance(e, dict) and {"name", "shape", "dtype"}
                                             <= e.keys() for e in spec):
        raise ValueError("--inputs must be a JSON list of {name, shape, dtype} objects")
    return spec

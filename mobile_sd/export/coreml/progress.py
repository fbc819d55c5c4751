"""coremltools' own progress bars, quiet when nobody watches: ``with coremltools_progress():``.

coremltools 9.0 draws nested tqdm bars (frontend ops, then one per MIL pass pipeline, then each
compression pass) and has no option to turn them off: each module binds ``tqdm`` when imported
and calls it without ``disable=``. In a log (stderr not a terminal) they are kilobytes of
carriage returns per export (21 KB for one tiny Core ML export).

Within the block, those module-level ``tqdm`` names point at a subclass whose ``disable``
defaults to ``None``: tqdm's own rule, off when its output (stderr) is not a TTY. Interactive
runs keep the bars, our own bars (export engine, bench) are untouched, and the names are put
back on exit. ``TQDM_DISABLE=1`` would also work but is read once at import and silences every
bar in the process, ours too.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

# coremltools 9.0 modules that bind tqdm at import (``grep -r "from tqdm import"``) and that
# our conversion, compression and bisect calls reach; any other loaded coremltools module
# holding tqdm is found by the scan of sys.modules.
_MODULES = ("coremltools.converters.mil.frontend.torch.ops",
            "coremltools.converters.mil.mil.passes.pass_pipeline",
            "coremltools.converters.mil.backend.nn.op_mapping",
            "coremltools.optimize.coreml._quantization_passes",
            "coremltools.optimize.coreml._post_training_quantization")
_NAMES = ("tqdm", "_tqdm")


def _bindings(base) -> list[tuple[object, str]]:
    for name in _MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    return [(module, attr) for name, module in list(sys.modules.items())
            if name.startswith("coremltools") and module is not None
            for attr in _NAMES if getattr(module, attr, None) is base]


@contextlib.contextmanager
def coremltools_progress(disable: bool | None = None) -> Iterator[list[str]]:
    """coremltools' bars get ``disable=disable`` unless a call passes its own; ``None`` (the
    default): off when stderr is not a TTY. Yields the rebound names (``module.attr``)."""
    import tqdm

    base = tqdm.tqdm

    class ScopedTqdm(base):   # a subclass keeps tqdm.write, locks and classmethods working
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("disable", disable)
            super().__init__(*args, **kwargs)

    bound = _bindings(base)
    for module, attr in bound:
        setattr(module, attr, ScopedTqdm)
    try:
        yield [f"{module.__name__}.{attr}" for module, attr in bound]
    finally:
        for module, attr in bound:
            setattr(module, attr, base)

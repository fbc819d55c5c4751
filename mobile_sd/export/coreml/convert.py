"""Core ML conversion: an :class:`~mobile_sd.export.components.ExportComponent` -> an ML Program.

The path is ``torch.export`` (not ``jit.trace``: deprecated in torch, and it fragments the heap
badly on the full-size UNet, see stack.md)::

    ep = torch.export.export(module, example_inputs).run_decompositions({})
    mlmodel = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                         compute_precision=ct.precision.FLOAT16, inputs=[...], outputs=[...])

Inputs and outputs are named after the component's ``TensorSpec`` (the converter would
auto-name outputs otherwise) and stay float32 at the boundary, as Apple's Swift package
feeds and reads them; compute runs in the recipe's precision inside.

Example (not run by the tests: it needs real artifacts)::

    mlmodel = convert_component(comp, "iOS17", "fp16")
    path = save_package(mlmodel, out_dir / "Unet.mlpackage")
    del mlmodel   # it holds the MIL program (every weight): drop it once saved

:func:`load_package` reopens a saved package with only the spec in memory (no runtime).
"""
from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from mobile_sd.export.components import ExportComponent
from mobile_sd.errors import ExportError, OutputDirError, RecipeError

# The file names Apple's StableDiffusion Swift package loads (StableDiffusionPipeline+Resources).
PACKAGE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "decoder": "VAEDecoder"}
TARGETS = ("iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")

Progress = Callable[[str], None]


def deployment_target(name: str) -> Any:
    """``ct.target`` member of a recipe target name.

    Example (not run by the tests: it needs real artifacts)::

        deployment_target("iOS18")
        # -> <AvailableTarget.iOS18: 9>
    """
    import coremltools as ct

    if name not in TARGETS:
        raise RecipeError(f"target {name!r} is not a Core ML target; valid: {', '.join(TARGETS)}")
    return getattr(ct.target, name)


def compute_precision(name: str) -> Any:
    import coremltools as ct

    if name not in PRECISIONS:
        raise RecipeError(f"precision {name!r} is not available for Core ML; valid: "
                          f"{', '.join(PRECISIONS)}")
    return ct.precision.FLOAT16 if name == "fp16" else ct.precision.FLOAT32


# Torch ops that coremltools 9.0 has no table entry for, mapped to its own translations.
# Each is exact; they are registered only while a conversion runs (see torch_op_patches).
_EXTRA_TORCH_OPS = {
    # transformers' CLIP (torch.export path) emits ``aten.alias`` for ``position_ids[:, :n]``;
    # coremltools registers ``alias_copy`` but not ``alias``. It returns its input: identity.
    "alias": "noop",
    # transformers 5's ``create_causal_mask`` emits ``where(mask, 0.0, min)``, i.e. the
    # ``where.ScalarOther`` overload; coremltools registers ``where.self`` and
    # ``where.ScalarSelf`` only. Its ``where`` translation promotes scalars to consts.
    "where.scalarother": "where",
}


@contextlib.contextmanager
def torch_op_patches() -> Iterator[None]:
    """Register the ops of ``_EXTRA_TORCH_OPS`` with coremltools while the block runs.

    Only names that coremltools does not already know are added, and exactly those are
    removed on exit, so nothing outside the conversion sees a changed op registry.

    Example (not run by the tests: it needs real artifacts)::

        with torch_op_patches():
            mlmodel = ct.convert(exported_clip, convert_to="mlprogram")
    """
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    table = _TORCH_OPS_REGISTRY.name_to_func_mapping
    added = [name for name in _EXTRA_TORCH_OPS if name not in table]
    for name in added:
        table[name] = getattr(ops, _EXTRA_TORCH_OPS[name])
    try:
        yield
    finally:
        for name in added:
            table.pop(name, None)


def export_program(comp: ExportComponent) -> Any:
    """``torch.export`` of the component's module on its example inputs (static shapes)."""
    import torch

    module = comp.module.eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, comp.example_inputs()).run_decompositions({})
    except Exception as exc:  # torch raises many types (UserError, Unsupported, TypeError...)
        raise ExportError(f"{comp.name}: torch.export failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); the module must "
                          "run with static shapes and tensor-only inputs") from exc


def convert_component(comp: ExportComponent, target: str, precision: str,
                      progress: Progress | None = None) -> Any:
    """Convert ``comp`` to an ML Program ``MLModel`` (not loaded: Linux cannot run it)."""
    import coremltools as ct
    import numpy as np

    from mobile_sd.export.coreml.progress import coremltools_progress

    report = progress or (lambda phase: None)
    report("torch.export")
    program = export_program(comp)
    inputs = [ct.TensorType(name=s.name, shape=s.shape, dtype=np.float32) for s in comp.inputs]
    outputs = [ct.TensorType(name=s.name, dtype=np.float32) for s in comp.outputs]
    report("ct.convert")
    try:
        with torch_op_patches(), coremltools_progress():   # bars only on a terminal
            mlmodel = ct.convert(program, convert_to="mlprogram", inputs=inputs, outputs=outputs,
                                 minimum_deployment_target=deployment_target(target),
                                 compute_precision=compute_precision(precision),
                                 skip_model_load=True)
    except OSError as exc:  # ct.convert writes the package into the temp folder first
        import tempfile

        raise disk_error(exc, Path(tempfile.gettempdir()) / f"{comp.name}.mlpackage") from exc
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as exc:
        raise ExportError(f"{comp.name}: Core ML conversion failed: {exc}; see docs/coreml.md "
                          "for the supported surgery passes") from exc
    finally:
        del program
        gc.collect()
    _describe(mlmodel, comp, target, precision)
    return mlmodel


def _describe(mlmodel: Any, comp: ExportComponent, target: str, precision: str) -> None:
    """Short description and provenance metadata, visible in Xcode's model viewer."""
    from importlib.metadata import version

    mlmodel.short_description = (f"mobile-sd {comp.name} ({comp.interface} interface, "
                                 f"{precision}, {target})")
    mlmodel.user_defined_metadata.update({
        "mobile_sd.component": comp.name, "mobile_sd.version": version("mobile-sd"),
        "mobile_sd.surgery": ",".join(comp.passes)})


def save_package(mlmodel: Any, path: Path) -> Path:
    """Save ``mlmodel`` to ``path`` (an ``.mlpackage``); disk errors become OutputDirError.

    A failed save removes what it wrote, so no half package is left under the final name.
    """
    from mobile_sd.export.coreml.reproducible import make_reproducible

    path = Path(path)
    try:
        mlmodel.save(str(path))
        make_reproducible(path)   # same inputs, same bytes (no random item ids)
    except BaseException as exc:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(exc, OSError):  # shutil.Error (from copytree) included
            raise disk_error(exc, path) from exc
        raise
    return path


def _is_disk_full(exc: BaseException) -> bool:
    # shutil.copytree collects per-file OSErrors into shutil.Error(list of (src, dst, why)).
    return isinstance(exc, shutil.Error) and any("No space left" in str(e) for e in exc.args)


def disk_error(exc: BaseException, path: Path) -> OutputDirError:
    """The OutputDirError for an OSError raised while writing ``path`` (ENOSPC or other)."""
    if _is_disk_full(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return OutputDirError(f"no space left on the device while writing {path.name} in "
                              f"{path.parent}; nothing was kept. Free disk space (the full "
                              "UNet needs ~2 GB, twice while saving) or choose another --out")
    return OutputDirError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}; "
                          "choose a writable --out")


def load_package(path: str | os.PathLike) -> Any:
    """Reopen a saved package without a runtime (spec + weights on disk, nothing compiled)."""
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True)

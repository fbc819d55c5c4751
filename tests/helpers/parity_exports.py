"""Export folders of the micro spec for the parity tests, written directly with the exporter
libraries (torch.onnx dynamo, ExecuTorch XNNPACK) and ``mobile_sd.manifest`` types, so the
parity tests do not depend on the export flows. Each folder is built once per test session,
under the session's temp folder (the ``parity_exports`` fixture of ``tests/conftest.py``).

``perturb=(component, parameter, delta)`` exports a module with one weight changed while the
manifest and the reference model stay the original: the export a parity run must reject.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
from pathlib import Path

import torch

from tests.helpers.paths import DATA

MICRO = str(DATA / "parity-micro.yaml")
BACKENDS = {"onnx": "onnxruntime", "executorch": "xnnpack", "coreml": "coreml"}


@functools.lru_cache(maxsize=None)
def micro_model():
    from mobile_sd.models.zoo import build_model

    return build_model(MICRO)


def recipe_for(fmt: str, latent_size: int = 8):
    from mobile_sd.recipes import Recipe

    return Recipe(name=f"test-{fmt}", format=fmt, backend=BACKENDS[fmt],
                  target="iOS17" if fmt == "coreml" else "host", precision="fp32",
                  latent_size=latent_size)


def _component(name: str, recipe, perturb):
    from mobile_sd.export.engine import build_component

    model = micro_model()
    own = dataclasses.replace(model, **{name: copy.deepcopy(getattr(model, name))})
    comp = build_component(own, name, recipe, ["attention_original"])
    if perturb and perturb[0] == name:
        with torch.no_grad():
            param = dict(comp.module.named_parameters())[perturb[1]]
            param.view(-1)[0] += perturb[2]
    comp.module.eval()
    return comp


def _export_onnx(comp, out: Path) -> list[Path]:
    path = out / f"{comp.name}.onnx"
    program = torch.onnx.export(comp.module, comp.example_inputs(), dynamo=True, verbose=False,
                                input_names=comp.input_names, output_names=comp.output_names,
                                opset_version=20)
    program.save(str(path))
    return [path]


def _export_pte(comp, out: Path, etrecord: str = "full") -> list[Path]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(comp.module, comp.example_inputs())
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       generate_etrecord=True)
    et = edge.to_executorch()
    from mobile_sd.export.executorch.etrecord import save_etrecord

    pte, path = out / f"{comp.name}.pte", out / f"{comp.name}.etrecord"
    pte.write_bytes(et.buffer)
    save_etrecord(et.get_etrecord(), path, etrecord)
    return [pte, path]


def _export_mlpackage(comp, out: Path) -> list[Path]:
    import coremltools as ct
    import numpy as np

    program = torch.export.export(comp.module, comp.example_inputs()).run_decompositions({})
    model = ct.convert(program, convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS17,
                       inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=np.float32)
                               for s in comp.inputs],
                       outputs=[ct.TensorType(name=s.name, dtype=np.float32) for s in comp.outputs])
    path = out / f"{comp.name}.mlpackage"
    model.save(str(path))
    return [path]


_EXPORTERS = {"onnx": _export_onnx, "executorch": _export_pte, "coreml": _export_mlpackage}


class ParityExports:
    """Export folders cached for one test session under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folders: dict[tuple, Path] = {}

    def export_folder(self, fmt: str, components: tuple[str, ...], perturb: tuple | None = None,
                      etrecord: str = "full") -> Path:
        """A complete export folder (manifest included) of ``components`` of the micro model
        (``etrecord``: the ETRecord mode of ExecuTorch exports). Built once, then shared:
        tests that change it take a :meth:`copy_folder`."""
        key = (fmt, components, perturb, etrecord)
        if key not in self._folders:
            name = f"{fmt}-{'-'.join(components)}-{'perturbed' if perturb else 'ok'}-{etrecord}"
            self._folders[key] = write_export_folder(self.root / name, fmt, components, perturb,
                                                     etrecord)
        return self._folders[key]

    def copy_folder(self, folder: Path, name: str) -> Path:
        """A private copy of a cached folder, for tests that break it."""
        target = self.root / "copies" / name
        shutil.copytree(folder, target)
        return target

    micro_model = staticmethod(micro_model)


def write_export_folder(out: Path, fmt: str, components: tuple[str, ...],
                        perturb: tuple | None = None, etrecord: str = "full") -> Path:
    from mobile_sd.manifest import ComponentEntry, FileEntry, Manifest, write_manifest
    from mobile_sd.models.folder import scheduler_config

    model, recipe = micro_model(), recipe_for(fmt)
    out.mkdir(parents=True)
    spec = model.spec
    pipeline = {"steps": spec.scheduler.default_steps, "guidance": spec.scheduler.default_guidance,
                "cfg": recipe.cfg, "latent_size": recipe.latent_size,
                "scaling_factor": spec.decoder.scaling_factor,
                "scheduler": scheduler_config(spec.scheduler)}
    manifest = Manifest.new(recipe.to_dict(), model.source, spec.name, pipeline, fmt,
                            recipe.backend)
    for name in components:
        comp = _component(name, recipe, perturb)
        files = (_export_pte(comp, out, etrecord) if fmt == "executorch"
                 else _EXPORTERS[fmt](comp, out))
        manifest.components[name] = ComponentEntry.from_export(
            {"files": [FileEntry.of(out, f, backend=recipe.backend) for f in files]},
            interface=comp.interface, surgery=list(comp.passes), inputs=comp.inputs,
            outputs=comp.outputs, min_psnr_db=recipe.component(name).min_psnr_db)
    write_manifest(out, manifest)
    return out


def edit_onnx_initializer(path: Path, name: str, delta: float = 1.0) -> None:
    """Add ``delta`` to the first value of initializer ``name`` of the ONNX file ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == name)
    value = numpy_helper.to_array(init).copy()
    value[0] += delta
    init.CopyFrom(numpy_helper.from_array(value, name))
    onnx.save(model, str(path))


def rehash_in_manifest(folder: Path, component: str, filename: str) -> None:
    """Record the current sha256 of ``filename`` in the folder's manifest (an edit that passes
    the integrity check, so parity compares values)."""
    import json

    from mobile_sd.utils.files import sha256_file

    from mobile_sd.utils.files import size_bytes

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(f for f in manifest["components"][component]["files"] if f["path"] == filename)
    entry["sha256"] = sha256_file(folder / filename)
    entry["bytes"] = size_bytes(folder / filename)
    (folder / "manifest.json").write_text(json.dumps(manifest))

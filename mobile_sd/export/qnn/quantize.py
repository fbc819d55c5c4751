"""w8a16 QDQ quantization of an ONNX model for the QNN HTP, calibrated on recorded inputs.

Public API::

    from mobile_sd.export.qnn.quantize import quantize_w8a16
    info = quantize_w8a16("unet.onnx", "unet_w8a16.onnx", calibration=[{"sample": ..., ...}, ...])
    # then mobile_sd.runtimes.qnn.htp.compile_context("unet_w8a16.onnx", ..., precision="w8a16")

Scheme: activations uint16 (asymmetric, MinMax calibration), weights uint8 per-tensor, biases
int32; QNN's own type rules applied by ``get_qnn_qdq_config``. 16-bit Q/DQ in the ONNX domain
needs opset >= 21 (export with ``torch.onnx.export(..., opset_version=21)``).

Graph surgery before calibration (:func:`prepare_for_htp`; each step keeps fp32 numerics,
tests/export/qnn/test_quantize.py checks it):

- additive attention-mask constants holding ``-inf`` / ``finfo.min`` (CLIP's causal mask)
  are clamped to ``mask_floor`` (-100): ``exp(-100)`` is ~4e-44, so softmax is unchanged in
  fp32, but the 16-bit range of the mask Add drops from ~3.4e38 (every score quantized to one
  step) to ~100. Tiny CLIP w8a16: 18 dB -> 26 dB PSNR.
- Erf-based GELU chains are fused into one ``Gelu`` node (ORT's ``FusionGelu``, the fusion
  ``qnn_preprocess_model`` applies), so GELU is one QDQ node unit (one 16-bit rounding, not
  five). The QNN EP rejects a lone ``Erf``; it fuses the float Erf-GELU chain by itself.
- unnamed nodes get names (for fallback reports and quantization overrides).

Why not ``qnn_preprocess_model`` itself: it first round-trips the model through ONNX Runtime's
basic optimizer, which inlines ``GroupNormalization`` (opset 21, a function op without a CPU
kernel) into ~12 primitive nodes. Measured on the tiny UNet: w8a16 on HTP fell from 32.4 dB to
10.3 dB PSNR and the ``LayerNormalization`` nodes left the HTP. The QNN EP runs
``GroupNormalization`` natively, so it must stay one node.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from mobile_sd.utils.staging import temp_dir_beside
from mobile_sd.errors import CalibrationError, ExportError, InvalidArgumentError, OutputDirError

MASK_THRESHOLD = -1.0e4      # constants at or below this feeding an Add are additive masks
MASK_FLOOR = -100.0
_EXTERNAL_DATA_BYTES = 1_500_000_000   # above this, save with external data (protobuf 2 GB cap)

_ONNX_TO_NP = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64,
               9: np.bool_, 2: np.uint8, 3: np.int8}


def _load(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InvalidArgumentError(f"ONNX model {path} does not exist")
    return onnx.load(str(path))


def _load_header(path):
    """The graph without external tensor data (names, inputs, opset: enough to check)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"ONNX model {path} does not exist")
    return onnx.load(str(path), load_external_data=False)


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --------------------------------------------------------------------------- surgery

def clamp_additive_masks(model, floor: float = MASK_FLOOR,
                         threshold: float = MASK_THRESHOLD) -> list[str]:
    """Clamps float constants (initializers / Constant nodes) that feed an ``Add`` and hold values
    <= ``threshold`` (``-inf``, ``finfo.min``) to ``floor``. Returns the tensors changed."""
    from onnx import numpy_helper

    add_inputs = {i for n in model.graph.node if n.op_type == "Add" for i in n.input}
    changed = []

    def clamp(tensor):
        arr = numpy_helper.to_array(tensor)
        if arr.dtype.kind != "f" or arr.size == 0 or not (arr <= threshold).any():
            return None
        return numpy_helper.from_array(np.maximum(arr, floor).astype(arr.dtype), tensor.name)

    for init in model.graph.initializer:
        if init.name in add_inputs and (new := clamp(init)) is not None:
            init.CopyFrom(new)
            changed.append(init.name)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in add_inputs:
            for attr in node.attribute:
                if attr.name == "value" and (new := clamp(attr.t)) is not None:
                    new.name = attr.t.name
                    attr.t.CopyFrom(new)
                    changed.append(node.output[0])
    return changed


def prepare_for_htp(model, *, mask_floor: float | None = MASK_FLOOR, in_place: bool = False):
    """The model (a copy when given a ModelProto, unless ``in_place``) with the
    numerics-preserving surgery above. Returns ``(model, report)``; report =
    {"masks_clamped": [...], "gelu_fused": bool, "nodes_named": int}."""
    import onnx
    from onnxruntime.quantization.fusions import FusionGelu
    from onnxruntime.quantization.onnx_model import ONNXModel

    proto = _load(model)
    if not in_place and isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    report = {"masks_clamped": [], "gelu_fused": False, "nodes_named": 0}
    if mask_floor is not None:
        report["masks_clamped"] = clamp_additive_masks(proto, mask_floor)
    wrapped = ONNXModel(proto)
    report["gelu_fused"] = bool(FusionGelu(wrapped).apply())
    used = {n.name for n in proto.graph.node}
    k = 0
    for node in proto.graph.node:
        if not node.name:
            while f"qnn_node_{k}" in used:
                k += 1
            node.name = f"qnn_node_{k}"
            used.add(node.name)
            report["nodes_named"] += 1
    if report["gelu_fused"]:
        wrapped.topological_sort()
    return proto, report


# --------------------------------------------------------------------------- calibration data

def _static_inputs(model) -> dict[str, tuple[type, list]]:
    inits = {i.name for i in model.graph.initializer}
    spec = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        spec[inp.name] = (_ONNX_TO_NP.get(t.elem_type), dims)
    return spec


def check_calibration(model, samples: Iterable[Mapping[str, np.ndarray]]) -> list[dict]:
    """The samples as a list of ``{input name: ndarray}`` matching the model's inputs (names,
    dtypes, static dims); CalibrationError naming the first mismatch."""
    spec = _static_inputs(_load(model))
    out = []
    for k, sample in enumerate(samples):
        if set(sample) != set(spec):
            raise CalibrationError(
                f"calibration sample {k} has inputs {sorted(sample)} but the model takes "
                f"{sorted(spec)}")
        feed = {}
        for name, (dtype, dims) in spec.items():
            arr = np.asarray(sample[name])
            if hasattr(sample[name], "detach"):          # a torch tensor
                arr = sample[name].detach().cpu().numpy()
            if dtype is not None and arr.dtype != dtype:
                raise CalibrationError(f"calibration sample {k} input {name!r} is {arr.dtype}, "
                                       f"the model wants {np.dtype(dtype)}")
            if len(arr.shape) != len(dims) or any(d is not None and d != s
                                                  for d, s in zip(dims, arr.shape)):
                raise CalibrationError(f"calibration sample {k} input {name!r} has shape "
                                       f"{list(arr.shape)}, the model wants {dims}")
            feed[name] = arr
        out.append(feed)
    if not out:
        raise CalibrationError("no calibration samples given (record a few pipeline inputs)")
    return out


def make_reader(samples: list[dict], between=None):
    """A rewindable ``CalibrationDataReader`` over a list of input dicts; ``between()`` (if
    given) runs before every sample after the first."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._samples = samples
            self._pos = 0

        def get_next(self):
            if self._pos >= len(self._samples):
                return None
            if self._pos and between is not None:
                between()
            self._pos += 1
            return self._samples[self._pos - 1]

        def rewind(self):
            self._pos = 0

        def __len__(self):
            return len(self._samples)

    return _Reader()


# --------------------------------------------------------------------------- quantize

def _model_bytes(model) -> int:
    return sum(len(i.raw_data) for i in model.graph.initializer)


def _write_prepared(model, mask_floor, path: Path) -> tuple[bool, dict]:
    """The HTP-prepared model saved at ``path`` (external data above the protobuf cap).
    Returns ``(external, surgery report)``. Only one copy of the model is held: a loaded file
    is prepared in place and dropped before anything else loads it."""
    import onnx

    own = not isinstance(model, onnx.ModelProto)
    prepared, report = prepare_for_htp(_load(model), mask_floor=mask_floor, in_place=own)
    external = _model_bytes(prepared) > _EXTERNAL_DATA_BYTES
    onnx.save_model(prepared, str(path), save_as_external_data=external,
                    location=f"{path.name}.data" if external else None)
    return external, report


def _lean_session(path: str):
    """A CPU session for the calibration graph without the memory arena and memory patterns.

    ORT's calibrator uses the defaults, where the arena grows with every calibration run: the
    full-size UNet's augmented graph went from 8.8 GB after one run to 14.8 GB after two
    (21 GB over 16 samples, measured); without them one run peaks at 8.7 GB and stays there.
    The same graph runs, so the ranges are the same."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's own
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _calibrate(prepared: Path, config, samples: list[dict], work: Path) -> Path:
    """MinMax activation ranges of ``prepared`` on ``samples``, saved as ORT's calibration cache
    (what ``quantize_static`` computes with ``get_qnn_qdq_config``'s settings).

    Run on its own, not inside ``quantize``: there ORT holds its model, the calibrator's
    augmented copy and the calibration session at once. Here the augmented graph is saved and
    its in-memory copy dropped before the session runs, the session is lean (above), and the
    quantizer loads the model only after the calibrator is gone."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, MinMaxCalibrater,
                                                    save_tensors_data)

    from mobile_sd.utils.env import release_freed_memory

    if config.calibrate_method != CalibrationMethod.MinMax:
        raise ExportError(f"w8a16 calibration supports MinMax, not {config.calibrate_method}")
    extra = config.extra_options or {}
    calibrator = MinMaxCalibrater(
        prepared, config.op_types_to_quantize, str(work / "augmented.onnx"),
        use_external_data_format=config.use_external_data_format,
        symmetric=extra.get("CalibTensorRangeSymmetric", False),
        moving_average=extra.get("CalibMovingAverage", False),
        averaging_constant=extra.get("CalibMovingAverageConstant", 0.01),
        max_intermediate_outputs=extra.get("CalibMaxIntermediateOutputs"))
    calibrator.augment_graph()
    calibrator.model = None          # saved to augmented.onnx; MinMax ranges need only the session
    release_freed_memory()
    calibrator.infer_session = _lean_session(calibrator.augmented_model_path)
    # Without the arena, each run's activations go back to the heap; trimming it between
    # samples hands them to the OS (the UNet's RSS otherwise crept up ~0.5 GB per sample).
    calibrator.collect_data(make_reader(samples, between=release_freed_memory))
    ranges = calibrator.compute_data()
    del calibrator
    release_freed_memory()
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)
    for p in work.glob("*"):
        if p.is_file() and p.name not in ("prepared.onnx", "prepared.onnx.data", cache.name):
            p.unlink()                   # the augmented graph and its external data
    return cache


def _quantize_with_ranges(prepared: Path, out: Path, config, cache: Path) -> None:
    """``quantize_static`` with the config ``get_qnn_qdq_config`` made and the cached ranges."""
    from onnxruntime.quantization import quantize_static

    quantize_static(str(prepared), str(out), None, calibrate_method=config.calibrate_method,
                    quant_format=config.quant_format, activation_type=config.activation_type,
                    weight_type=config.weight_type,
                    op_types_to_quantize=config.op_types_to_quantize,
                    nodes_to_quantize=config.nodes_to_quantize,
                    nodes_to_exclude=config.nodes_to_exclude, per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    use_external_data_format=config.use_external_data_format,
                    calibration_providers=config.calibration_providers,
                    extra_options=config.extra_options, calibration_cache_path=str(cache))


def quantize_w8a16(model, out: str | Path, calibration: Iterable[Mapping[str, np.ndarray]], *,
                   per_channel: bool = False, mask_floor: float | None = MASK_FLOOR,
                   overwrite: bool = False) -> dict:
    """Writes a w8a16 QDQ model for the QNN HTP to ``out`` (via a temp folder, renamed into
    place). ``calibration``: input dicts recorded from the pipeline (e.g. the UNet's
    sample/timestep/encoder_hidden_states at several steps and prompts). ``per_channel`` quantizes
    Conv weights per channel (int8 symmetric); off by default: it also gives LayerNormalization
    scales a per-channel axis, which sends those nodes to the CPU. Returns a manifest dict."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    import onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputDirError(f"{out} exists; pass overwrite=True to replace it")
    header = model if isinstance(model, onnx.ModelProto) else _load_header(model)
    if _opset(header) < 21:
        raise ExportError(f"w8a16 needs ONNX opset >= 21 for 16-bit QuantizeLinear (the model has "
                          f"opset {_opset(header)}): export with torch.onnx.export(..., "
                          f"opset_version=21)")
    samples = check_calibration(header, calibration)
    del header
    tmp = temp_dir_beside(out)
    try:
        prep_path = tmp / "prepared.onnx"
        external, report = _write_prepared(model, mask_floor, prep_path)
        weight_type = QuantType.QInt8 if per_channel else QuantType.QUInt8
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)     # ORT's quantizer warns per tensor
        try:
            config = get_qnn_qdq_config(str(prep_path), make_reader(samples),
                                        activation_type=QuantType.QUInt16,
                                        weight_type=weight_type, per_channel=per_channel)
            config.use_external_data_format = external
            cache = _calibrate(prep_path, config, samples, tmp)
            staged = tmp / "staged"
            staged.mkdir()
            _quantize_with_ranges(prep_path, staged / out.name, config, cache)
        finally:
            logging.getLogger().setLevel(level)
        written = sorted(staged.iterdir())
        for p in written:                              # data files first, the .onnx last
            if p.name != out.name:
                os.replace(p, out.parent / p.name)
        os.replace(staged / out.name, out)
    except (CalibrationError, ExportError):
        raise
    except OSError as exc:
        raise OutputDirError(f"cannot write {out}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises plain exceptions
        raise ExportError(f"w8a16 quantization of {getattr(model, 'name', model)} failed: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                          ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"scheme": "w8a16", "activations": "uint16 asymmetric (MinMax)",
            "weights": "int8 symmetric per-channel (Conv)" if per_channel else
            "uint8 per-tensor", "calibration_samples": len(samples),
            "external_data": external, **report}

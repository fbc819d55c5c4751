"""Qualcomm QNN (HTP) lowering: AOT compile to a context binary inside the ``.pte``.

This path needs the Qualcomm AI Engine Direct SDK (QAIRT) on this machine, pointed to by
``QNN_SDK_ROOT``: the AOT compiler calls the SDK's ``libQnnHtp.so`` to build the context
binary. Without it :func:`require_qnn_sdk` raises before any work, so no artifact (fake or
partial) is ever written. ExecuTorch's wheel would otherwise try to download the SDK, which
fails offline.

It has NOT been run here: no SDK is installed on the development machine. The code follows the
executorch 1.5.1 sources (``backends/qualcomm/utils/utils.py``:
``generate_htp_compiler_spec``, ``generate_qnn_executorch_compiler_spec``,
``to_edge_transform_and_lower_to_qnn``; ``backends/qualcomm/quantizer/quantizer.py``:
``QnnQuantizer``) and the ExecuTorch Qualcomm examples. Running the ``.pte`` needs a device
with the matching SoC and the SDK's runtime libraries pushed beside the runner.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mobile_sd.errors import BackendUnavailableError, RecipeError

DEFAULT_SOC = "SM8650"  # Snapdragon 8 Gen 3
_HOW = ("install the Qualcomm AI Engine Direct SDK (QAIRT 2.x, from Qualcomm's developer site; "
        "the version executorch 1.5.1 was built against) and set QNN_SDK_ROOT to its folder "
        "(the one holding lib/x86_64-linux-clang/libQnnHtp.so)")


def require_qnn_sdk() -> Path:
    """The SDK folder from ``QNN_SDK_ROOT``, or BackendUnavailableError saying what to install."""
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        raise BackendUnavailableError(f"backend 'qnn' needs the Qualcomm SDK but QNN_SDK_ROOT is "
                                      f"not set: {_HOW}. Nothing was written")
    path = Path(root)
    lib = path / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
    if not lib.is_file():
        raise BackendUnavailableError(f"QNN_SDK_ROOT={root} does not hold a Qualcomm SDK ({lib} is "
                                      f"missing): {_HOW}. Nothing was written")
    return path


def _chipset(soc: str):
    from executorch.backends.qualcomm.utils.utils import get_soc_to_chipset_map

    chipsets = get_soc_to_chipset_map()
    if soc not in chipsets:
        raise RecipeError(f"unknown Qualcomm SoC {soc!r}; known: {', '.join(sorted(chipsets))}")
    return chipsets[soc]


def quantize_for_qnn(module: torch.nn.Module, example_inputs: tuple, calibration: Iterable,
                     soc: str, input_names: Sequence[str] | None = None) -> torch.fx.GraphModule:
    """8-bit activations / 8-bit per-channel weights with QNN's own quantizer (not XNNPACK's)."""
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from mobile_sd.compress.pt2e import calibrate

    quantizer = QnnQuantizer(soc_model=_chipset(soc))
    quantizer.set_default_quant_config(QuantDtype.use_8a8w, is_conv_per_channel=True,
                                       is_linear_per_channel=True)
    prepared = prepare_pt2e(torch.export.export(module, example_inputs).module(), quantizer)
    calibrate(prepared, example_inputs, calibration, input_names)
    return convert_pt2e(prepared)


def lower_qnn(module: torch.nn.Module, example_inputs: tuple, precision: str,
              calibration: Iterable | None = None, soc: str = DEFAULT_SOC,
              input_names: Sequence[str] | None = None, etrecord: bool = True):
    """EdgeProgramManager with the graph delegated to QNN HTP (fp16 or 8a8w), with an ETRecord
    when asked."""
    require_qnn_sdk()
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec, generate_qnn_executorch_compiler_spec,
        to_edge_transform_and_lower_to_qnn)

    if precision == "int8":
        module = quantize_for_qnn(module, example_inputs, calibration, soc, input_names)
    specs = generate_qnn_executorch_compiler_spec(
        soc_model=_chipset(soc),
        backend_options=generate_htp_compiler_spec(use_fp16=precision == "fp16"))
    return to_edge_transform_and_lower_to_qnn(module, example_inputs, specs,
                                              generate_etrecord=etrecord)

"""Snapdragon SoCs the QNN HTP path targets.

``soc_model`` is QNN's chipset id (``QnnHtpDevice`` SoC model; the same numbers as
ExecuTorch's ``QcomChipset`` enum in ``backends/qualcomm/serialization/qc_schema.py``), passed
to ONNX Runtime's QNN EP as provider option ``soc_model``; ``htp_arch`` is the Hexagon
generation (provider option ``htp_arch``). Each id was checked to create an HTP device in the
QAIRT 2.51 emulator (``onnxruntime-qnn`` 2.7.0) and to run conv+GroupNorm+SiLU there; an
unknown id (e.g. 999) fails with ``QNN_DEVICE_ERROR_INVALID_CONFIG``.
"""
from __future__ import annotations

from dataclasses import dataclass

from mobile_sd.errors import RecipeError


@dataclass(frozen=True)
class Soc:
    name: str           # Qualcomm part number, e.g. "SM8650"
    product: str        # marketing name
    soc_model: int      # QNN chipset id (provider option "soc_model")
    htp_arch: int       # Hexagon HTP generation, 73 = v73 (provider option "htp_arch")
    vtcm_mb: int        # VTCM size in MB

    def provider_options(self) -> dict[str, str]:
        return {"soc_model": str(self.soc_model), "htp_arch": str(self.htp_arch)}

    def manifest(self) -> dict:
        return {"soc": self.name, "product": self.product, "soc_model": self.soc_model,
                "htp_arch": f"v{self.htp_arch}", "vtcm_mb": self.vtcm_mb}


SOCS: dict[str, Soc] = {s.name: s for s in (
    Soc("SM8550", "Snapdragon 8 Gen 2", 43, 73, 8),
    Soc("SM8650", "Snapdragon 8 Gen 3", 57, 75, 8),
    Soc("SM8750", "Snapdragon 8 Elite", 69, 79, 8),
)}
DEFAULT_SOC = "SM8650"


def get_soc(name: str | Soc | None = None) -> Soc:
    """The :class:`Soc` for a part number (case-insensitive; None -> the default SM8650);
    RecipeError listing the known ones otherwise."""
    if isinstance(name, Soc):
        return name
    key = DEFAULT_SOC if name is None else str(name).strip().upper()
    if key not in SOCS:
        known = ", ".join(f"{s.name} ({s.product}, HTP v{s.htp_arch})" for s in SOCS.values())
        raise RecipeError(f"unknown Qualcomm SoC {name!r} for the QNN HTP backend; known: {known}")
    return SOCS[key]

"""Weight compression: fast near-optimal palettization, mixed-bit selection, Core ML packaging.

Modules: ``kmeans`` (batched 1-D k-means: ``histogram`` keys, ``solver``, ``polish``), ``palettize``
(one tensor), ``module`` (a torch module), ``config`` (three-level CompressionConfig),
``coreml_apply`` (into a converted mlprogram; coremltools imported lazily), ``mixed_bit`` and
``mixed_bit_plot`` (bits per weight from measured sensitivity).
"""
from mobile_sd.compress.config import CompressionConfig, PalettizeSpec, QuantizeSpec
from mobile_sd.compress.coreml_apply import compress_mlmodel
from mobile_sd.compress.kmeans import KMeansResult, kmeans_1d
from mobile_sd.compress.module import ModulePalettization, TensorReport, palettize_module
from mobile_sd.compress.palettize import Palettized, palettize_tensor, weight_snr_db

__all__ = ["CompressionConfig", "PalettizeSpec", "QuantizeSpec", "compress_mlmodel",
           "KMeansResult", "kmeans_1d",
           "ModulePalettization", "TensorReport", "palettize_module", "Palettized",
           "palettize_tensor", "weight_snr_db"]

"""Qualcomm HTP (Hexagon NPU) through ONNX Runtime's QNN execution provider.

``onnxruntime-qnn`` (a plugin EP for a stock ``onnxruntime``) bundles QAIRT's x86_64
``libQnnHtp.so`` + ``libHtpPrepare.so``: on a Linux x86_64 host the HTP backend runs as an
emulator, so the same code compiles context binaries for a phone and runs them here.

- :mod:`.socs`: the Snapdragon SoCs we target (QNN ``soc_model`` ids, HTP arch).
- :mod:`.htp`: availability check, session factory (all nodes on HTP), context binary compiler,
  node-assignment / fallback report, QAIRT version for manifests.
- :mod:`.runner`: the parity runner of a compiled context binary (``qnn_context`` files).

w8a16 quantization (an export step) lives in :mod:`mobile_sd.export.qnn.quantize`.
"""

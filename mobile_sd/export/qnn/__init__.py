"""``format: qnn`` exports: ONNX (opset 21) -> optional w8a16 QDQ -> QNN HTP context binary.

- :mod:`.quantize`: w8a16 quantization calibrated on recorded pipeline inputs (+ mask clamp).
- :mod:`.flow`: the exporter registered in :func:`mobile_sd.export.engine.exporters`.
"""

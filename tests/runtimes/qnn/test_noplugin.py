"""QNN HTP helpers that need no onnxruntime-qnn: the install hint, the log parser."""
from __future__ import annotations

import sys

import pytest

from mobile_sd.errors import BackendUnavailableError
from mobile_sd.runtimes.qnn import htp


def test_missing_plugin_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)      # import fails
    with pytest.raises(BackendUnavailableError) as exc:
        htp.require_htp()
    msg = str(exc.value)
    assert "pip install onnxruntime-qnn==2.7.0" in msg and "\n" not in msg
    assert htp.htp_available() is False


def test_parse_rejections():
    log = ("2026 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation FAILED "
           "for 1 nodes in OrtNodeUnit (Erf) :\n"
           "\tOperator type: Erf Node name: my erf/1 Node index: 0\n"
           "\tREASON : Operators of type `Erf` are not supported by QNN EP.\n\n"
           "x Validation PASSED for 1 nodes in OrtNodeUnit (Relu) :\n"
           "\tOperator type: Relu Node name: r Node index: 1\n")
    assert htp.parse_rejections(log) == {
        "my erf/1": "Operators of type `Erf` are not supported by QNN EP."}

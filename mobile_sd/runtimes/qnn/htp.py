"""Qualcomm HTP through ONNX Runtime's QNN execution provider (``onnxruntime-qnn`` plugin).

On Linux x86_64 the bundled QAIRT ``libQnnHtp.so`` runs the HTP as an emulator: the same calls
compile a context binary for a phone's NPU and run it (slowly) on this CPU.

Public API::

    from mobile_sd.runtimes.qnn import htp
    htp.require_htp()                         # BackendUnavailableError if onnxruntime-qnn is missing
    sess = htp.create_session("unet.onnx", soc="SM8650", precision="fp16")   # every node on HTP
    ctx = htp.compile_context("unet.onnx", "out/unet_htp.onnx", soc="SM8650", precision="fp16")
    sess = htp.create_session(ctx.onnx_path, soc="SM8650")       # loads the precompiled binary
    report = htp.node_assignment("model.onnx", soc="SM8650", precision="fp16")
    report.all_on_htp, report.partitions, report.fallback        # [(name, op_type, reason), ...]
    htp.qairt_info()                                             # versions for manifests

Precisions: ``fp16`` runs a float ONNX model with HTP fp16 math (``enable_htp_fp16_precision``);
``w8a16`` runs a QDQ model made by :func:`mobile_sd.export.qnn.quantize.quantize_w8a16`.
Sessions are strict by default: ``session.disable_cpu_ep_fallback=1`` makes ONNX Runtime refuse a
graph with any node left for its CPU EP; the error then names those nodes (from
:func:`node_assignment`).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mobile_sd.utils.staging import temp_dir_beside
from mobile_sd.errors import (BackendUnavailableError, ExportError, InvalidArgumentError,
                              OutputDirError, UnsupportedOpError)

from .socs import Soc, get_soc

EP_NAME = "QNNExecutionProvider"
PIP_REQUIREMENT = "onnxruntime-qnn==2.7.0"
PRECISIONS = ("fp16", "w8a16")
_HOW = (f"pip install {PIP_REQUIREMENT} (ONNX Runtime's QNN EP plugin bundling QAIRT 2.51; "
        f"wheel checked for Linux x86_64 (manylinux_2_35), needs onnxruntime>=1.24.2)")
_FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"


# --------------------------------------------------------------------------- availability

def _qnn_module():
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise BackendUnavailableError(f"the QNN HTP backend needs onnxruntime-qnn, which is not "
                                      f"installed: {_HOW}") from exc
    return onnxruntime_qnn


def ep_devices() -> list:
    """The QNN EP's ``OrtEpDevice`` list, registering the plugin library once per process."""
    import onnxruntime as ort

    mod = _qnn_module()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        try:
            ort.register_execution_provider_library(EP_NAME, mod.get_library_path())
        except Exception as exc:  # noqa: BLE001 - any load failure means "not usable here"
            raise BackendUnavailableError(
                f"onnxruntime-qnn {getattr(mod, '__version__', '?')} is installed but its EP "
                f"library does not load into onnxruntime {ort.__version__}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; {_HOW}") from exc
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise BackendUnavailableError(f"onnxruntime-qnn loaded but offers no {EP_NAME} device "
                                      f"on this machine; {_HOW}")
    return devices


def require_htp() -> dict:
    """Checks that the QNN HTP EP loads; returns :func:`qairt_info`. BackendUnavailableError
    (one line saying how to install) otherwise."""
    ep_devices()
    return qairt_info()


def htp_available() -> bool:
    try:
        ep_devices()
    except BackendUnavailableError:
        return False
    return True


def qairt_info() -> dict:
    """Versions for manifests: onnxruntime-qnn, the QAIRT (QNN SDK) it bundles, onnxruntime."""
    import onnxruntime as ort

    mod = _qnn_module()
    info = getattr(mod, "build_and_package_info", None)
    return {"backend": "qnn-htp", "onnxruntime_qnn": getattr(mod, "__version__", None),
            "qairt": getattr(info, "qnn_version", None), "onnxruntime": ort.__version__}


# --------------------------------------------------------------------------- sessions

def provider_options(soc: str | Soc | None = None, precision: str = "fp16") -> dict[str, str]:
    """QNN EP provider options for the HTP backend of one SoC and precision."""
    s = get_soc(soc)
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown HTP precision {precision!r}; use one of "
                                   f"{', '.join(PRECISIONS)}")
    opts = {"backend_type": "htp", **s.provider_options(),
            # graph-input Q / graph-output DQ of a QDQ model run on HTP too (ORT's default
            # offloads them to the CPU EP, which a strict session refuses)
            "offload_graph_io_quantization": "0"}
    if precision == "fp16":
        opts["enable_htp_fp16_precision"] = "1"
    return opts


def session_options(soc: str | Soc | None = None, precision: str = "fp16", *, strict: bool = True,
                    log_severity: int = 3, intra_op_threads: int | None = None,
                    config: dict[str, str] | None = None):
    """``onnxruntime.SessionOptions`` with the QNN HTP EP appended (and, when ``strict``, CPU
    fallback disabled). Graph-assignment recording is always on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(ep_devices(), provider_options(soc, precision))
    return so


def _model_kind(model: str | Path) -> str:
    """'context' (EPContext wrapper), 'qdq' or 'float' from the graph's op types."""
    import onnx

    path = Path(model)
    if not path.is_file():
        raise InvalidArgumentError(f"ONNX model {path} does not exist")
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    if "EPContext" in ops:
        return "context"
    return "qdq" if {"QuantizeLinear", "DequantizeLinear"} & ops else "float"


def _check_precision(model: str | Path, precision: str) -> None:
    kind = _model_kind(model)
    if precision == "w8a16" and kind == "float":
        raise InvalidArgumentError(f"{model} is a float model: precision 'w8a16' needs a QDQ model "
                                   f"(mobile_sd.export.qnn.quantize.quantize_w8a16), or use 'fp16'")
    if precision == "fp16" and kind == "qdq":
        raise InvalidArgumentError(f"{model} is a QDQ (quantized) model: use precision 'w8a16'")


def _session(model: str | Path, so, soc: Soc, precision: str, strict: bool):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model), so)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/RuntimeException types
        msg = str(exc)
        if strict and _FALLBACK_REFUSED in msg:
            report = node_assignment(model, soc, precision)
            raise UnsupportedOpError(
                f"{model}: {len(report.fallback)} node(s) cannot run on the HTP of {soc.name} "
                f"({precision}) and CPU fallback is disabled: {report.describe_fallback()}") from exc
        first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
        raise ExportError(f"QNN HTP ({soc.name}, {precision}) could not load {model}: {first}") from exc


def create_session(model: str | Path, soc: str | Soc | None = None, precision: str = "fp16", *,
                   strict: bool = True, intra_op_threads: int | None = None):
    """An InferenceSession of ``model`` (float ONNX, QDQ ONNX or a context-binary wrapper from
    :func:`compile_context`) on the HTP of ``soc``. With ``strict`` (default) every node must run
    on HTP: otherwise UnsupportedOpError names the nodes that would fall back and why."""
    s = get_soc(soc)
    _check_precision(model, precision)
    so = session_options(s, precision, strict=strict, intra_op_threads=intra_op_threads)
    return _session(model, so, s, precision, strict)


# --------------------------------------------------------------------------- node assignment

@dataclass(frozen=True)
class FallbackNode:
    name: str
    op_type: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.op_type} '{self.name}'" + (f" ({self.reason})" if self.reason else "")


@dataclass
class HtpAssignment:
    """Where ONNX Runtime put the nodes of a model (after its layout transformation, so HTP node
    counts include the Transposes the EP inserts for NHWC)."""
    htp_nodes: int
    partitions: int                              # QNN subgraphs (one HTP graph each)
    fallback: list[FallbackNode] = field(default_factory=list)

    @property
    def all_on_htp(self) -> bool:
        return not self.fallback and self.partitions > 0

    @property
    def total_nodes(self) -> int:
        return self.htp_nodes + len(self.fallback)

    def describe_fallback(self, limit: int = 20) -> str:
        if not self.fallback:
            return "none"
        text = "; ".join(str(n) for n in self.fallback[:limit])
        more = len(self.fallback) - limit
        return text + (f"; and {more} more" if more > 0 else "")

    def as_dict(self) -> dict:
        return {"htp_nodes": self.htp_nodes, "partitions": self.partitions,
                "fallback": [{"name": n.name, "op_type": n.op_type, "reason": n.reason}
                             for n in self.fallback]}


def session_assignment(session, reasons: dict[str, str] | None = None) -> HtpAssignment:
    """HtpAssignment of a live session (made by this module, or any session created with
    ``session.record_ep_graph_assignment_info=1``), from ``get_provider_graph_assignment_info``."""
    reasons = reasons or {}
    htp_nodes = partitions = 0
    fallback: list[FallbackNode] = []
    for sub in session.get_provider_graph_assignment_info():
        nodes = sub.get_nodes()
        if sub.ep_name == EP_NAME:
            partitions += 1
            htp_nodes += len(nodes)
        else:
            fallback += [FallbackNode(n.name, n.op_type, reasons.get(n.name, f"on {sub.ep_name}"))
                         for n in nodes]
    return HtpAssignment(htp_nodes, partitions, fallback)


_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit")
_NODE = re.compile(r"^\s*Operator type: (\S+) Node name: (.*?) Node index: \d+\s*$")
_REASON = re.compile(r"^\s*REASON\s*:\s*(.*?)\s*$")


def parse_rejections(log_text: str) -> dict[str, str]:
    """Node name -> the QNN EP's reason for rejecting it, from a verbose ORT log
    (``LogNodeSupport``: "Validation FAILED ... Operator type: T Node name: N ... REASON : R")."""
    reasons: dict[str, str] = {}
    pending: list[str] | None = None
    for line in log_text.splitlines():
        if _FAILED.search(line):
            pending = []
            continue
        if pending is None:
            continue
        node = _NODE.match(line)
        if node:
            pending.append(node.group(2))
            continue
        reason = _REASON.match(line)
        if reason:
            for name in pending:
                reasons.setdefault(name, reason.group(1))
        pending = None
    return reasons


class _CapturedStderr:
    """Redirects file descriptor 2 (where ONNX Runtime's default logger writes) to a temp file.
    Process-wide while active: meant for a short, single-threaded diagnostic call."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


def node_assignment(model: str | Path, soc: str | Soc | None = None,
                    precision: str = "fp16") -> HtpAssignment:
    """How many nodes / partitions of ``model`` run on the HTP and which fall back to the CPU EP
    and why. Builds a session with CPU fallback allowed and assignment recording on
    (``session.record_ep_graph_assignment_info`` -> ``get_provider_graph_assignment_info``), with a
    verbose ORT log captured to read the EP's rejection reasons."""
    import onnxruntime as ort

    s = get_soc(soc)
    _check_precision(model, precision)
    so = session_options(s, precision, strict=False, log_severity=0)
    so.log_verbosity_level = 0
    with _CapturedStderr() as log:
        try:
            sess = ort.InferenceSession(str(model), so)
        except Exception:  # noqa: BLE001
            sess = None
    if sess is None:
        raise ExportError(f"QNN HTP ({s.name}, {precision}) could not load {model} even with CPU "
                          f"fallback allowed: {_last_error(log.text)}")
    return session_assignment(sess, parse_rejections(log.text))


def _last_error(log_text: str) -> str:
    errors = [ln for ln in log_text.splitlines() if "[E:" in ln]
    return errors[-1].split("] ", 1)[-1].strip() if errors else "see the ONNX Runtime log"


# --------------------------------------------------------------------------- context binaries

@dataclass
class ContextBinary:
    """A precompiled QNN context: ``onnx_path`` is the EPContext wrapper ONNX Runtime loads,
    ``bin_paths`` the QNN context binaries it references (same folder)."""
    onnx_path: Path
    bin_paths: list[Path]
    soc: Soc
    precision: str
    sdk_version: str | None = None
    assignment: HtpAssignment | None = None    # where the compile session put the nodes

    def manifest(self) -> dict:
        return {"format": "qnn-context-binary (onnxruntime EPContext wrapper)",
                "onnx": self.onnx_path.name, "bins": [p.name for p in self.bin_paths],
                "precision": self.precision, **self.soc.manifest(),
                "ep_sdk_version": self.sdk_version, **qairt_info(),
                **({"htp": self.assignment.as_dict()} if self.assignment else {})}


def _context_sdk_version(wrapper: Path) -> str | None:
    import onnx

    for node in onnx.load(str(wrapper), load_external_data=False).graph.node:
        if node.op_type == "EPContext":
            for attr in node.attribute:
                if attr.name == "ep_sdk_version":
                    return attr.s.decode()
    return None


def compile_context(model: str | Path, out: str | Path, soc: str | Soc | None = None,
                    precision: str = "fp16", *, overwrite: bool = False,
                    embed: bool = False) -> ContextBinary:
    """Compiles ``model`` for the HTP of ``soc`` into a context binary: ``out`` (an EPContext
    wrapper .onnx) + ``<out stem>_qnn.bin`` beside it (``embed=True``: the binary inside the
    .onnx). Every node must run on HTP (UnsupportedOpError names those that cannot). Written in a
    temp folder next to ``out`` and renamed into place (binary first), so ``out`` is never a
    partial file; an existing ``out`` is kept unless ``overwrite``."""
    s = get_soc(soc)
    out = Path(out)
    if out.suffix != ".onnx":
        raise InvalidArgumentError(f"context wrapper path {out} must end with .onnx")
    _check_precision(model, precision)
    if _model_kind(model) == "context":
        raise InvalidArgumentError(f"{model} is already a compiled context binary wrapper")
    bin_path = out.with_name(f"{out.stem}_qnn.bin")
    if not overwrite and (out.exists() or bin_path.exists()):
        raise OutputDirError(f"{out if out.exists() else bin_path} exists; pass overwrite=True "
                             f"to replace it")
    tmp = temp_dir_beside(out)
    try:
        so = session_options(s, precision, strict=True, config={
            "ep.context_enable": "1", "ep.context_file_path": str(tmp / out.name),
            "ep.context_embed_mode": "1" if embed else "0"})
        sess = _session(model, so, s, precision, strict=True)
        assignment = session_assignment(sess)
        del sess                             # the EP writes the context when the session ends
        wrapper = tmp / out.name
        if not wrapper.is_file():
            raise ExportError(f"QNN EP wrote no context wrapper for {model} (expected {wrapper})")
        bins = sorted(p for p in tmp.iterdir() if p != wrapper)
        moved = []
        for p in bins:                       # binaries first: the wrapper must never dangle
            os.replace(p, out.parent / p.name)
            moved.append(out.parent / p.name)
        os.replace(wrapper, out)
    except OSError as exc:
        raise OutputDirError(f"cannot write the context binary to {out.parent}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ContextBinary(out, moved, s, precision, _context_sdk_version(out), assignment)


def compile_for_socs(model: str | Path, out_dir: str | Path, socs: Sequence[str | Soc],
                     precision: str = "fp16", *, stem: str | None = None,
                     overwrite: bool = False) -> dict[str, ContextBinary]:
    """One context binary per SoC: ``out_dir/<stem>_<soc>.onnx`` (+ ``_qnn.bin``)."""
    stem = stem or Path(model).stem
    result = {}
    for soc in socs:
        s = get_soc(soc)
        result[s.name] = compile_context(model, Path(out_dir) / f"{stem}_{s.name.lower()}.onnx",
                                         s, precision, overwrite=overwrite)
    return result

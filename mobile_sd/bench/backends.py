"""Device side of the runner: load one artifact with its runtime and time it.

Imported only by ``python -m mobile_sd.bench.runner``; each runtime is imported inside its
function, so timing an ONNX file never imports torch. Programs are loaded the one way
:mod:`mobile_sd.runtimes` loads them.
"""
from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path
from typing import Callable

from mobile_sd.errors import BackendUnavailableError
from mobile_sd.utils.env import peak_rss_mb



def bench_artifact(artifact: Path, args: argparse.Namespace,
                   time_loop: Callable[[Callable[[], object], int, int], dict]) -> dict:
    """Load ``artifact``, run warm-up + timed iterations; return the result-line fields."""
    from mobile_sd.bench.inputs import load_inputs_arg, make_inputs

    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist on this device")
    inputs = make_inputs(load_inputs_arg(args.inputs), args.seed)
    suffix = artifact.suffix
    if suffix == ".pte":
        return _bench_pte(artifact, inputs, args, time_loop)
    if suffix == ".onnx":
        return _bench_onnx(artifact, inputs, args, time_loop)
    if suffix in (".mlpackage", ".mlmodelc"):
        return _bench_coreml(artifact, inputs, args, time_loop)
    raise ValueError(f"cannot benchmark {artifact.name}: expected .pte, .onnx or .mlpackage")


def _bench_pte(path: Path, inputs: dict, args, time_loop) -> dict:
    import torch

    from mobile_sd.runtimes.pte import load_program, missing_backend, registered_backends, set_threads

    needed = missing_backend(args.backend)
    if needed:
        raise BackendUnavailableError(
            f"{path.name} is delegated to {needed}, which this ExecuTorch runtime does not "
            f"register (it has {registered_backends()}); run it on a device whose runtime "
            "includes that backend (Core ML: an Apple device)")
    set_threads(args.threads)  # before a method is loaded: resetting later crashes
    tensors = [torch.from_numpy(a) for a in inputs.values()]
    rss_before = peak_rss_mb()

    def load(etdump: bool):
        data = Path(args.data_path) if args.data_path else None
        program = load_program(path, data, enable_etdump=etdump)
        names = sorted(program.method_names)
        method = program.load_method("forward" if "forward" in names else names[0])
        _check_pte_inputs(method.metadata, inputs)
        return program, method

    start = time.perf_counter()
    program, method = load(False)
    load_ms = (time.perf_counter() - start) * 1e3
    times = time_loop(lambda: method.execute(tensors), args.warmup, args.iters)
    peak = peak_rss_mb()
    etdump_skip = 0
    if args.etdump:
        # A separate profiled pass: event tracing must not inflate the timed iterations.
        del program, method
        gc.collect()
        program, method = load(True)
        etdump_skip = 1 if args.warmup else 0
        for _ in range(etdump_skip + 1):
            method.execute(tensors)
        program.write_etdump_result_to_file(args.etdump, args.etdump + ".debug")
        Path(args.etdump + ".debug").unlink(missing_ok=True)
    return {"runtime": {"name": "executorch", "version": _version("executorch")},
            "load_ms": load_ms, **times, "rss_before_load_mb": rss_before, "peak_rss_mb": peak,
            "etdump": args.etdump, "etdump_skip_runs": etdump_skip, "placement": None}


def _check_pte_inputs(meta, inputs: dict) -> None:
    wanted = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    given = [tuple(a.shape) for a in inputs.values()]
    if wanted != given:
        raise ValueError(f"manifest input shapes {given} do not match the program's {wanted}; "
                         "re-export or fix the manifest")


def _bench_onnx(path: Path, inputs: dict, args, time_loop) -> dict:
    import onnxruntime as ort

    from mobile_sd.runtimes.ort import cpu_session

    rss_before = peak_rss_mb()
    start = time.perf_counter()
    session = cpu_session(path, args.threads, quiet=False)
    load_ms = (time.perf_counter() - start) * 1e3
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != sorted(inputs):
        raise ValueError(f"manifest inputs {sorted(inputs)} do not match the ONNX model's "
                         f"{sorted(names)}; re-export or fix the manifest")
    times = time_loop(lambda: session.run(None, inputs), args.warmup, args.iters)
    return {"runtime": {"name": "onnxruntime", "version": ort.__version__}, "load_ms": load_ms,
            **times, "rss_before_load_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "etdump": None, "etdump_skip_runs": 0, "placement": None}


def _bench_coreml(path: Path, inputs: dict, args, time_loop) -> dict:
    if platform.system() != "Darwin":
        raise BackendUnavailableError(
            f"Core ML predictions of {path.name} need macOS (coremltools cannot predict on "
            f"{platform.system()}); run the bench with --target mac on a Mac with Xcode, or "
            "--target ios for an iPhone")
    import coremltools as ct

    units = args.compute_units or "ALL"
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[units])
    load_ms = (time.perf_counter() - start) * 1e3
    times = time_loop(lambda: model.predict(inputs), args.warmup, args.iters)
    return {"runtime": {"name": "coreml", "version": _version("coremltools"),
                        "os": platform.mac_ver()[0], "compute_units": units},
            "load_ms": load_ms, **times, "rss_before_load_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(), "etdump": None, "etdump_skip_runs": 0,
            "placement": compute_plan_placement(model, units)}


def compute_plan_placement(model, units: str) -> dict | None:
    """Ops per preferred device from Core ML's compute plan (macOS 14.4+), else None."""
    try:
        import coremltools as ct
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(),
                                            compute_units=ct.ComputeUnit[units])
        program = plan.model_structure.program
        if program is None:
            return None
        counts: dict[str, int] = {}
        by_op: dict[str, dict[str, int]] = {}
        for op in program.functions["main"].block.operations:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            device = _device_kind(usage.preferred_compute_device) if usage else "unknown"
            counts[device] = counts.get(device, 0) + 1
            per = by_op.setdefault(op.operator_name, {})
            per[device] = per.get(device, 0) + 1
        return {"ops_per_device": counts, "by_op_type": by_op}
    except Exception:  # noqa: BLE001 - the plan is extra information; never fail a run for it
        return None


def _device_kind(device) -> str:
    name = type(device).__name__
    return {"MLCPUComputeDevice": "cpu", "MLGPUComputeDevice": "gpu",
            "MLNeuralEngineComputeDevice": "ane"}.get(name, name)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None

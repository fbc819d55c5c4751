"""Numerical parity of exports: each artifact on the runtime available here against eager
PyTorch (per component, two tiers), the whole pipeline end to end, and a divergence locator.

Example (not run by the tests: it needs real artifacts)::

    from mobile_sd.parity import ParityOptions, run_parity
    report = run_parity("artifacts/android", build_model("snapfusion"),
                        ParityOptions(prompts=["a cat"]))
    report["summary"]
    # -> {'status': 'pass', 'passed': 4, 'failed': 0, 'skipped': 0}

Command line: ``mobile-sd parity ARTIFACT_DIR [--model DIR | --spec NAME]`` (see
:mod:`mobile_sd.commands.parity`). Modules: :mod:`.metrics` (the one implementation of PSNR, SQNR,
cosine, abs errors, SSIM), :mod:`.runtimes` (load/run/check artifacts), :mod:`.eager` (the
references), :mod:`.check` (tiers), :mod:`.e2e`, :mod:`.locate` (+ ``locate_onnx``,
``locate_et``, ``locate_et_taps``, ``locate_coreml``), :mod:`.swift_app` (Apple's Swift app
emulated on a Core ML bundle), :mod:`.report`, :mod:`.run`.
Heavy libraries are imported inside the functions that use them.
"""
__all__ = ["ParityOptions", "run_parity", "default_out_dir"]


def __getattr__(name: str):
    # Lazy: the CLI imports mobile_sd.commands.parity to build its parser; that must stay cheap.
    if name in __all__:
        from mobile_sd.parity import run

        return getattr(run, name)
    raise AttributeError(f"module 'mobile_sd.parity' has no attribute {name!r}")

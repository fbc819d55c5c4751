"""Shared fixtures: tiny model folders written once per test session, the CLI runner."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A complete snapfusion-tiny model folder (decoder-only vae_decoder/)."""
    from mobile_sd.models.folder import write_model_folder
    from mobile_sd.models.zoo import build_model

    out = tmp_path_factory.mktemp("models") / "snapfusion-tiny"
    write_model_folder(build_model("snapfusion-tiny"), out)
    return out


@pytest.fixture(scope="session")
def sd15_tiny_folder(tmp_path_factory):
    """A complete sd15-tiny model folder (full AutoencoderKL in vae/)."""
    from mobile_sd.models.folder import write_model_folder
    from mobile_sd.models.zoo import build_model

    out = tmp_path_factory.mktemp("models") / "sd15-tiny"
    write_model_folder(build_model("sd15-tiny"), out)
    return out


@pytest.fixture
def cli(capsys):
    """Run ``mobile-sd ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from mobile_sd.commands.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Micro-spec export folders (ONNX, ExecuTorch, Core ML) built once per session."""
    from tests.helpers.parity_exports import ParityExports

    return ParityExports(tmp_path_factory.mktemp("parity-exports"))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run ~100x faster on one thread (thread
    contention dominates). Folders of such tests use it autouse in their conftest."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

"""The runner protocol: argument list and result-line parsing shared by every transport."""
from __future__ import annotations

import json

import pytest

from mobile_sd.bench.runner import (PROTOCOL, load_inputs_arg, make_inputs, parse_progress,
                                    parse_result_line, runner_args)
from mobile_sd.bench.transports import Target, parse_target
from mobile_sd.errors import InvalidArgumentError


def test_runner_args():
    inputs = [{"name": "sample", "shape": [2, 4, 8, 8], "dtype": "float32"}]
    assert runner_args("w/unet.pte", inputs, 2, 10, backend="xnnpack", etdump="w/unet.etdp",
                       threads=4) == [
        "--artifact", "w/unet.pte", "--inputs", json.dumps(inputs, separators=(",", ":")),
        "--warmup", "2", "--iters", "10", "--seed", "0", "--backend", "xnnpack",
        "--etdump", "w/unet.etdp", "--threads", "4"]


def test_parse_result_line_ignores_runtime_noise():
    good = {"protocol": PROTOCOL, "status": "ok", "iteration_ms": [1.0]}
    stdout = "\n".join(["[cpuinfo_utils.cpp:71] Reading file", "{not json", '{"other": 1}',
                        json.dumps(good), "OutputX 0: tensor(...)"])
    assert parse_result_line(stdout) == good
    assert parse_result_line("Segmentation fault") is None


def test_parse_progress():
    stderr = ("mobile-sd-iter warmup 1/1 9.5\nnoise\nmobile-sd-iter timed 1/3 4.25\n"
              "mobile-sd-iter timed 2/3 4.5\n")
    assert parse_progress(stderr) == {"warmup_ms": [9.5], "iteration_ms": [4.25, 4.5]}


def test_inputs_spec(tmp_path):
    spec = [{"name": "ids", "shape": [2, 77], "dtype": "int64", "high": 49408},
            {"name": "x", "shape": [1, 4], "dtype": "float16"}]
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(spec))
    assert load_inputs_arg("@" + str(path)) == spec == load_inputs_arg(json.dumps(spec))
    arrays = make_inputs(spec, seed=1)
    assert arrays["ids"].dtype.name == "int64" and arrays["ids"].shape == (2, 77)
    assert 0 <= arrays["ids"].min() and arrays["ids"].max() < 49408
    assert arrays["x"].dtype.name == "float16"
    with pytest.raises(ValueError, match="--inputs must be a JSON list"):
        load_inputs_arg('{"name": "x"}')


@pytest.mark.parametrize("text, target", [
    ("local", Target("local")), ("host", Target("local")), ("adb", Target("adb")),
    ("adb:R5CT", Target("adb", "R5CT")),
    ("ios", Target("ios", None, "ALL")), ("mac", Target("mac", None, "ALL")),
    ("mac:cpu_only", Target("mac", None, "CPU_ONLY")),
])
def test_parse_target(text, target):
    assert parse_target(text) == target


@pytest.mark.parametrize("text, words", [("android", "unknown --target 'android'"),
                                         ("mac:GPU", "unknown compute units 'GPU'"),
                                         ("local:x", "unknown --target 'local:x'")])
def test_bad_target(text, words):
    with pytest.raises(InvalidArgumentError, match=words):
        parse_target(text)


def test_docstring_examples():
    """The examples in the bench modules' docstrings run as written."""
    import doctest

    from mobile_sd.bench import budget, stats, transports
    from mobile_sd.bench import runner as runner_module
    from mobile_sd.bench.transports import adb, executor_runner

    for module in (budget, stats, transports, runner_module, adb, executor_runner):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__

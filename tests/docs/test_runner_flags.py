"""Every ``--flag`` the docs pass to ExecuTorch's device runners exists in that runner.

The runners' ``--help`` is recorded in ``tests/data/runners/`` (how: its README). A command in a
fenced code block of ``docs/*.md`` that calls ``executor_runner`` or ``example_runner`` has each
``--flag`` after the binary checked against the recorded help of that runner.
"""
from __future__ import annotations

import re

import pytest

from tests.helpers.paths import DATA, DOCS

RUNNERS = {"executor_runner": "executor_runner_help.txt",
           "example_runner": "bundled_runner_help.txt"}
_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)   # list items indent
_SEPARATORS = {"|", ";", "&&", "||", ">", "2>"}


def recorded_flags(runner: str) -> set[str]:
    """Flag names of ``runner`` in its recorded gflags help (``    -name (help...)``)."""
    text = (DATA / "runners" / RUNNERS[runner]).read_text()
    return set(re.findall(r"^    -(\w+) \(", text, re.M))


def commands(markdown: str) -> list[str]:
    """Shell commands of the fenced code blocks, backslash continuations joined."""
    out = []
    for block in _FENCE.findall(markdown):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return out


def runner_flags(command: str) -> list[tuple[str, str]]:
    """(runner, flag) for each ``--flag`` passed to a runner binary in ``command``."""
    found, runner = [], None
    for token in command.split():
        if token.startswith("#"):   # a shell comment: the rest of the line is prose
            break
        name = token.rsplit("/", 1)[-1]
        if name in RUNNERS:
            runner = name
        elif token in _SEPARATORS or token.endswith(";"):
            runner = None
        elif runner and token.startswith("--"):
            found.append((runner, token[2:].split("=", 1)[0]))
    return found


def doc_flags() -> list[tuple[str, str, str]]:
    return [(path.name, runner, flag) for path in sorted(DOCS.glob("*.md"))
            for command in commands(path.read_text()) for runner, flag in runner_flags(command)]


def test_recorded_help_has_the_flags_we_rely_on():
    assert {"model_path", "data_path", "num_executions", "etdump_path"} <= recorded_flags(
        "executor_runner")
    bundled = recorded_flags("example_runner")
    assert {"bundled_program_path", "output_verification"} <= bundled
    assert "data_path" not in bundled     # the bundled-IO runner cannot take a .ptd


def test_docs_name_runner_flags():
    """The check below has something to check: the Android page runs both runners."""
    runners = {(doc, runner) for doc, runner, _ in doc_flags()}
    assert {("android_runner.md", "executor_runner"),
            ("android_runner.md", "example_runner")} <= runners


@pytest.mark.parametrize("doc,runner,flag", doc_flags())
def test_every_documented_flag_exists(doc, runner, flag):
    assert flag in recorded_flags(runner), (
        f"docs/{doc} passes --{flag} to {runner}, which has no such flag (recorded help: "
        f"tests/data/runners/{RUNNERS[runner]})")


def test_a_wrong_flag_is_caught():
    block = ("```bash\nadb shell /data/local/tmp/executor_runner \\\n"
             "  --model_path m.pte --bpte m.bpte  # --not_this\n```\n")
    flags = [f for c in commands(block) for _, f in runner_flags(c)]
    assert flags == ["model_path", "bpte"] and "bpte" not in recorded_flags("executor_runner")

"""Hostile command lines, one row each: the real ``mobile_sd.commands.cli.main`` in-process on
tiny specs. Every refusal exits 2 with exactly one stderr line and touches nothing: the whole
test folder (the user's files, the model folder, mounts) is byte-for-byte the same afterwards,
with no temp folder, lock file or ``.old`` copy left behind.

A new case is one :class:`Case` row. ``build(env)`` creates the user's files and returns argv.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import manifests
from tests.helpers.paths import REPO

ONNX = REPO / "export_recipes" / "onnx-snapfusion.yaml"
TINY = ["--spec", "snapfusion-tiny"]
GEN = ["generate", *TINY, "--latent-size", "8", "--steps", "1", "--prompt", "a cat", "--quiet"]
UNCHANGED = "unchanged"   # post-condition: the whole test folder is exactly as before


@dataclass
class Env:
    tmp: Path
    tiny_folder: Path
    mounts: Callable
    holds: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def model(self) -> Path:
        """The user's model folder proj/model (a copy of a tiny one)."""
        folder = self.tmp / "proj" / "model"
        shutil.copytree(self.tiny_folder, folder)
        return folder

    def user_dir(self, name: str = "userdir") -> Path:
        folder = self.tmp / name
        (folder / "sub").mkdir(parents=True)
        (folder / "thesis.tex").write_text("years of work\n")
        (folder / "sub" / "data.bin").write_bytes(os.urandom(1000))
        return folder

    def user_file(self, name: str, data: bytes = b"not an image\n") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def locked(self, out: Path) -> Path:
        """Hold ``out``'s output lock as another writer would, for the command's duration."""
        from mobile_sd.utils.files import output_lock

        out.parent.mkdir(parents=True, exist_ok=True)
        self.holds.enter_context(output_lock(out))
        return out


@dataclass
class Case:
    name: str
    build: Callable[[Env], list]
    code: int
    message: str
    post: str | Callable[[Env], None] | None = UNCHANGED

    def __str__(self) -> str:
        return self.name


def _export(out, *extra, model: Path | None = None) -> list:
    source = ["--model", model] if model is not None else TINY
    return ["export", "--recipe", ONNX, *source, "--latent-size", "8", "--out", out, *extra]


def _foreign_manifest(env: Env) -> Path:
    folder = env.user_dir()
    (folder / "manifest.json").write_text(json.dumps({"schema": "someone-else/v3"}))
    return folder


def _downloaded_model(env: Env) -> Path:
    """A diffusers folder not written by mobile-sd (model_index.json without _mobile_sd)."""
    folder = env.user_dir("hub-model")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def _bench_folder(env: Env) -> Path:
    folder = env.tmp / "exported"
    folder.mkdir()
    (folder / "unet.pte").write_bytes(b"pte bytes")
    manifests.write(folder, {"format": "executorch", "backend": "coreml", "components": {"unet": {
        "files": [{"path": "unet.pte", "format": "pte", "backend": "coreml"}],
        "inputs": [{"name": "sample", "shape": [1, 4, 8, 8]}]}}})
    return folder


def _bad_component_manifest(env: Env) -> Path:
    folder = env.tmp / "exported"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "schema": "mobile-sd/manifest/v1", "components": {"unet": 5}}))
    return folder


def _model_folder_ok(env: Env) -> None:
    index = json.loads((env.tmp / "proj" / "model" / "model_index.json").read_text())
    assert index["_mobile_sd"]["spec"] == "snapfusion-tiny"
    assert sorted(p.name for p in (env.tmp / "proj").iterdir()) == ["model"]   # no leftovers


def _png_replaced(env: Env) -> None:
    from PIL import Image

    assert Image.open(env.tmp / "old.png").size == (64, 64)   # latent 8 -> 64 px


CASES = [
    # --force never deletes what is not ours; the model folder is never an output.
    Case("export-out-is-model", lambda e: _export(e.tmp / "proj" / "model", "--force", model=e.model()),
         2, "is the model folder"),
    Case("export-out-contains-model", lambda e: _export(e.tmp / "proj", "--force", model=e.model()),
         2, "contains the model folder"),
    Case("export-out-inside-model",
         lambda e: _export(e.tmp / "proj" / "model" / "onnx", "--force", model=e.model()),
         2, "is inside the model folder"),
    Case("export-out-symlink-to-model",
         lambda e: (os.symlink(e.model(), e.tmp / "link"), _export(e.tmp / "link", "--force",
                                                                   model=e.tmp / "proj" / "model"))[1],
         2, "is the model folder"),
    Case("export-force-over-user-folder", lambda e: _export(e.user_dir(), "--force"),
         2, "--force refused"),
    Case("export-force-over-foreign-manifest", lambda e: _export(_foreign_manifest(e), "--force"),
         2, "is a folder that is not an export folder"),
    Case("export-force-over-plain-file", lambda e: _export(e.user_file("report.pdf"), "--force"),
         2, "is a file that is not an export folder"),
    Case("export-over-user-folder-without-force", lambda e: _export(e.user_dir()),
         2, "already exists and is not empty"),
    Case("export-force-over-symlink", lambda e: (os.symlink(e.user_dir(), e.tmp / "l"),
                                                 _export(e.tmp / "l", "--force"))[1],
         2, "is a symbolic link"),
    Case("export-concurrent-writer", lambda e: _export(e.locked(e.tmp / "out")),
         2, f"being written by another mobile-sd process (pid {os.getpid()}"),
    Case("export-latent-size-huge", lambda e: _export(e.tmp / "out", "--latent-size", "1000000"),
         2, "--latent-size must be"),
    Case("export-out-parent-is-file", lambda e: _export(e.user_file("f") / "out"),
         2, "is a file, not a folder"),
    Case("export-out-readonly-fs", lambda e: _export(e.mounts("ro", "readonly") / "out"),
         2, "not writable"),
    Case("init-force-over-user-folder",
         lambda e: ["init", *TINY, "--out", e.user_dir(), "--force"], 2, "--force refused"),
    Case("init-force-over-downloaded-model",
         lambda e: ["init", *TINY, "--out", _downloaded_model(e), "--force"],
         2, "not a model folder written by `mobile-sd init`"),
    Case("init-concurrent-writer", lambda e: ["init", *TINY, "--out", e.locked(e.tmp / "m")],
         2, "being written by another mobile-sd process"),
    # generate: staged outputs, bounded arguments.
    Case("generate-out-readonly-fs", lambda e: [*GEN, "--out", e.mounts("ro", "readonly") / "a.png"],
         2, "not writable (read-only file system"),
    Case("generate-out-existing-dir", lambda e: [*GEN, "--out", e.user_dir()], 2, "is a folder"),
    Case("generate-out-parent-is-file", lambda e: [*GEN, "--out", e.user_file("f") / "a" / "a.png"],
         2, "is a file, not a folder"),
    Case("generate-out-full-disk", lambda e: [*GEN, "--out", e.mounts("full", "full") / "a.png"],
         2, "no space left"),
    Case("generate-record-readonly-fs",
         lambda e: [*GEN, "--out", e.tmp / "imgs" / "a.png",
                    "--record", e.mounts("ro", "readonly") / "r.safetensors"],
         2, "not writable"),   # imgs/ it had created is gone again
    Case("generate-record-full-disk-after-png",
         lambda e: [*GEN, "--out", e.user_file("imgs/keep.txt").parent / "a.png",
                    "--record", e.mounts("full", "full") / "r.safetensors"],
         2, "no space left", UNCHANGED),
    Case("generate-out-over-user-file", lambda e: [*GEN, "--out", e.user_file("notes.png")],
         2, "exists and is not a PNG image"),
    Case("generate-out-and-record-same-file",
         lambda e: [*GEN, "--out", e.tmp / "x", "--record", e.tmp / "x"], 2, "are the same file"),
    Case("generate-out-device-file", lambda e: [*GEN, "--out", "/dev/null"],
         2, "--out /dev/null exists and is not a PNG image"),
    Case("generate-out-symlink-to-png",
         lambda e: (os.symlink(e.user_file("real.png", b"\x89PNG\r\n\x1a\nx"), e.tmp / "l.png"),
                    [*GEN, "--out", e.tmp / "l.png"])[1],
         2, "is a symbolic link; refusing to replace it"),
    Case("generate-record-over-user-file",
         lambda e: [*GEN, "--out", e.tmp / "a.png", "--record", e.user_file("w.safetensors")],
         2, "exists and is not a mobile-sd recording"),
    Case("generate-out-inside-model",
         lambda e: ["generate", "--model", e.model(), "--prompt", "x", "--quiet",
                    "--out", e.tmp / "proj" / "model" / "a.png"],
         2, "is inside the model folder"),
    Case("generate-concurrent-writer", lambda e: [*GEN, "--out", e.locked(e.tmp / "a.png")],
         2, "being written by another mobile-sd process"),
    Case("generate-seed-beyond-64-bits", lambda e: [*GEN, "--seed", 2**64, "--out", e.tmp / "a.png"],
         2, "--seed must be an integer in 0..2**64-1"),
    Case("generate-seed-negative", lambda e: [*GEN, "--seed", -1, "--out", e.tmp / "a.png"],
         2, "--seed must be"),
    Case("generate-latent-size-huge",
         lambda e: [*GEN, "--latent-size", 1000000, "--out", e.tmp / "a.png"],
         2, "--latent-size must be a multiple of 8 in 8..256 (256 latent = 2048 px"),
    Case("generate-latent-size-odd", lambda e: [*GEN, "--latent-size", 12, "--out", e.tmp / "a.png"],
         2, "--latent-size must be a multiple of 8"),
    *[Case(f"generate-guidance-{g}", lambda e, g=g: [*GEN, f"--guidance={g}", "--out", e.tmp / "a.png"],
           2, "--guidance must be a finite number >= 0 and <= 100")
      for g in ("1e308", "nan", "inf", "-inf", "-1")],
    *[Case(f"generate-steps-{s}", lambda e, s=s: [*GEN, "--steps", s, "--out", e.tmp / "a.png"],
           2, msg) for s, msg in (("nan", "invalid int value: 'nan'"),
                                  ("inf", "invalid int value: 'inf'"),
                                  ("1000000", "--steps must be an integer in 1..1000"))],
    Case("generate-variant-with-spec", lambda e: [*GEN, "--variant", "fp16", "--out", e.tmp / "a.png"],
         2, "--variant selects weight files of a --model folder"),
    Case("generate-variant-not-in-folder",
         lambda e: ["generate", "--model", e.model(), "--variant", "fp16", "--prompt", "x",
                    "--quiet", "--out", e.tmp / "a.png"],
         2, "variant 'fp16' was requested"),
    Case("generate-variant-bad-name",
         lambda e: ["generate", "--model", e.model(), "--variant", "../x", "--prompt", "x",
                    "--quiet", "--out", e.tmp / "a.png"],
         2, "variant '../x': expected a name like 'fp16'"),
    # Positive controls: what is ours is replaced (so the refusals above are not blanket ones).
    Case("init-force-replaces-its-own-folder",
         lambda e: ["init", *TINY, "--out", e.model(), "--force"], 0, "", _model_folder_ok),
    Case("generate-replaces-its-png", lambda e: [*GEN, "--out", e.user_file("old.png", b"\x89PNG\r\n\x1a\nold")],
         0, "", _png_replaced),
    # parity / bench
    Case("parity-component-not-an-object", lambda e: ["parity", _bad_component_manifest(e), *TINY],
         2, "components.unet must be an object"),
    Case("bench-ios-measured-nothing",
         lambda e: ["bench", _bench_folder(e), "--target", "ios", "--out", e.tmp / "b"],
         2, "nothing was measured on --target ios", None),
    Case("bench-mac-measured-nothing",
         lambda e: ["bench", _bench_folder(e), "--target", "mac", "--out", e.tmp / "b"],
         2, "pass --allow-skipped to accept", None),
    Case("bench-ios-allow-skipped",
         lambda e: ["bench", _bench_folder(e), "--target", "ios", "--out", e.tmp / "b",
                    "--allow-skipped"], 0, "", None),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): file sha256, 'dir', or symlink target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                seen[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                seen[key] = "dir"
            else:
                seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_command_line(case: Case, tmp_path, tiny_folder, mounts, cli):
    env = Env(tmp_path, tiny_folder, mounts)
    with env.holds:
        argv = case.build(env)
        before = snapshot(tmp_path)
        code, _, err = cli(*argv)
        after = snapshot(tmp_path)
    assert code == case.code, err
    if case.code:
        assert err.count("\n") == 1 and err.startswith("mobile-sd: error: "), err
        assert case.message in err, err
    if case.post == UNCHANGED:
        assert after == before
    elif callable(case.post):
        case.post(env)

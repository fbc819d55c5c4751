"""Tiny models on one thread; file systems that fail for real (read-only, full)."""
from __future__ import annotations

import subprocess

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mount(folder, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")


@pytest.fixture
def mounts(tmp_path):
    """``make(name, kind)`` mounts a tiny tmpfs at ``tmp_path/name``: ``readonly`` (holding a
    user file, then remounted read-only: root's writes fail with EROFS, unlike chmod 0555) or
    ``full`` (64 KiB, filled by a user file: writes fail with ENOSPC). Unmounted after."""
    mounted = []

    def make(name: str, kind: str):
        folder = tmp_path / name
        _mount(folder, "size=64k,mode=0755")
        mounted.append(folder)
        user_file = folder / "user-notes.txt"
        if kind == "readonly":
            user_file.write_text("the user's notes\n")
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            with open(user_file, "wb", buffering=0) as handle:   # fill every block
                try:
                    while True:
                        handle.write(b"u" * 4096)
                        handle.flush()
                except OSError:
                    pass
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)

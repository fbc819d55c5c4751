"""The import graph stays one-way (tools/check_imports.py): the real tree passes, and the
checker does catch an arrow back up and a circle."""
from __future__ import annotations

import importlib.util

from tests.helpers.paths import REPO


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mobile_sd_has_no_upward_import_and_no_circle():
    assert _checker().problems() == []


def test_commands_are_imported_by_nothing():
    checker = _checker()
    graph = checker.graph_of()
    users = sorted(src for src, dsts in graph.items() for dst in dsts
                   if dst.startswith("mobile_sd.commands") and not src.startswith("mobile_sd.commands")
                   and src not in checker.ENTRY_POINTS)
    assert users == []


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / "mobile_sd" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_an_upward_import(tmp_path):
    _tree(tmp_path, {"__init__.py": "", "models/__init__.py": "",
                     "models/zoo.py": "def f():\n    from mobile_sd.export.engine import run_export\n",
                     "export/__init__.py": "", "export/engine.py": "run_export = 1\n"})
    found = _checker().problems(tmp_path)
    assert found == ["mobile_sd.models.zoo imports mobile_sd.export.engine: 'export' is not "
                     "below 'models'"]


def test_checker_finds_a_circle_inside_a_package(tmp_path):
    _tree(tmp_path, {"__init__.py": "", "parity/__init__.py": "",
                     "parity/a.py": "from mobile_sd.parity import b\n",
                     "parity/b.py": "from mobile_sd.parity.a import x\n"})
    assert _checker().problems(tmp_path) == [
        "import circle: mobile_sd.parity.a <-> mobile_sd.parity.b"]

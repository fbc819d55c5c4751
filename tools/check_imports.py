#!/usr/bin/env python3
"""Check mobile-sd's import graph: no arrow back up between top-level packages, no circle.

Every ``import`` of a ``mobile_sd`` module counts, including those inside functions (a lazy
import is still a dependency). Two rules:

1. **Layers.** Data flows one way (recipe -> load -> surgery -> compress -> export -> parity ->
   bench -> report); each top-level package may import only its own layer or lower ones
   (:data:`LAYERS`). ``commands`` is the top: nothing imports it.
2. **No circles** between modules, inside a package too.

Exit 1 listing every violation; run by ``make test`` and by ``tests/test_import_graph.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mobile_sd"

#: Bottom to top. A module may import from its own layer's packages only if it is the same
#: top-level package (siblings in one layer do not import each other).
LAYERS: list[set[str]] = [
    {"errors", "names", "__main__"},
    {"config", "utils", "metrics"},
    {"models"},
    {"pipeline"},
    {"surgery"},
    {"compress"},
    {"recipes", "manifest"},
    {"runtimes"},
    {"export"},
    {"parity"},
    {"bench"},
    {"report"},
    {"commands"},
]
ENTRY_POINTS = {"mobile_sd.__main__"}   # may import commands


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The ``mobile_sd`` modules ``path`` imports (``from pkg import sub`` -> ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m != name}


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    return None


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = [f"{m}: top-level '{_top(m)}' is in no layer; add it to LAYERS in tools/check_imports.py"
           for m in sorted(graph) if m != PACKAGE and layer_of(m) is None]
    for src, targets in sorted(graph.items()):
        if src == PACKAGE or src in ENTRY_POINTS or layer_of(src) is None:
            continue
        for dst in sorted(targets):
            if dst != PACKAGE and dst not in graph:
                bad.append(f"{src} imports {dst}, which does not exist")
                continue
            if dst == PACKAGE or _top(src) == _top(dst):
                continue
            if layer_of(dst) >= layer_of(src):
                bad.append(f"{src} imports {dst}: '{_top(dst)}' is not below '{_top(src)}'")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports_of(path, name, known) for name, path in known.items()}


def problems(root: Path = ROOT) -> list[str]:
    graph = graph_of(root)
    # A package's __init__ re-exporting its own submodules is not a circle.
    internal = {src: {d for d in dsts if not (src != PACKAGE and d.startswith(src + ".")
                                              and src in _packages(root))}
                for src, dsts in graph.items()}
    found = layer_violations(graph)
    found += [f"import circle: {' <-> '.join(c)}" for c in cycles(internal)]
    return found


def _packages(root: Path) -> set[str]:
    return {name for name, path in modules(root).items() if path.name == "__init__.py"}


def main() -> int:
    found = problems()
    for line in found:
        print(f"check_imports: {line}", file=sys.stderr)
    if found:
        print(f"check_imports: {len(found)} problem(s); see LAYERS in {__file__}", file=sys.stderr)
        return 1
    print(f"check_imports: {len(graph_of())} modules, layers respected, no circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())

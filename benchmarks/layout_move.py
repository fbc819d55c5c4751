"""Issue "one home per format": the same full-size exports before and after the layout move.

Usage: ``.venv/bin/python benchmarks/layout_move.py [--before 500b51a] [--after HEAD]
[--kinds ios android] [--work /tmp/layout-move] [--reuse]``. Writes
``benchmarks/results/layout_move.{json,md}``.

Each ref is checked out with ``git worktree add --detach`` under ``--work`` and runs
``make export-ios`` / ``make export-android``'s command (full-size snapfusion, seeded random
weights) in its own process under ``/usr/bin/time -v``, one export at a time, before and after
interleaved so both see the same machine load. The comparison is per file: the sha256 and size
of every file each manifest lists, and the manifests' content with the fields that change on
every run left out (dates, git sha, machine, timings, peak RSS). ``--reuse`` takes finished
runs from ``--work`` (``out-<label>-<kind>/`` beside ``out-<label>-<kind>.time``) instead of
exporting again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import ROOT, time_report, write_results

RECIPES = {"ios": "export_recipes/ios-snapfusion-fast.yaml",
           "android": "export_recipes/android-snapfusion-xnnpack-fp32.yaml"}
VOLATILE = {"created", "git_sha", "machine", "tool_versions", "export_seconds", "peak_rss_mb",
            "seconds"}
# The CLI's entry point moved with the layout; run whichever the checkout has.
MAIN = ("import sys\ntry:\n    from mobile_sd.commands.cli import main\nexcept ImportError:\n"
        "    from mobile_sd.cli import main\nsys.exit(main())")


def checkout(ref: str, work: Path) -> Path:
    src = work / f"src-{ref[:10]}"
    if not src.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), ref],
                       check=True, capture_output=True)
    return src


def export(src: Path, kind: str, out: Path) -> Path:
    """One export under /usr/bin/time -v; returns the file with time's report."""
    report = out.with_suffix(".time")
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv/bin/python"), "-c", MAIN, "export",
           "--recipe", RECIPES[kind], "--spec", "snapfusion", "--out", str(out), "--force"]
    with open(report, "w") as err:
        subprocess.run(cmd, cwd=src, env={**os.environ, "PYTHONPATH": str(src)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=err)
    return report


def measured(report: Path) -> dict:
    found = time_report(report.read_text())
    return {k: found[k] for k in ("wall_s", "cpu_s", "peak_rss_gb")}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def files_of(manifest: dict) -> dict[str, tuple[int, str]]:
    entries = [f for c in manifest["components"].values() for f in c["files"]]
    entries += manifest.get("extra_files", [])
    return {f["path"]: (f["bytes"], f["sha256"]) for f in entries}


def differences(a, b, where: str = "") -> list[str]:
    """Keys whose values differ between two stripped manifests (paths like components.unet.x)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            sub = f"{where}.{key}" if where else key
            if key not in a or key not in b:
                out.append(f"{sub} ({'only after' if key not in a else 'only before'})")
            else:
                out += differences(a[key], b[key], sub)
        return out
    return [] if a == b else [where]


def package_content(path: Path) -> str:
    """sha256 of an ``.mlpackage``'s content: every weight file's bytes and the model spec
    serialized deterministically. coremltools writes a random UUID per item into the
    package's Manifest.json and serializes the metadata map in no fixed order, so two saves
    of the same program never have the same bytes."""
    import hashlib

    from coremltools.proto import Model_pb2

    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "Manifest.json"):
        data = file.read_bytes()
        if file.suffix == ".mlmodel":
            spec = Model_pb2.Model()
            spec.ParseFromString(data)
            data = spec.SerializeToString(deterministic=True)
        digest.update(str(file.relative_to(path)).encode() + data)
    return digest.hexdigest()


def compare(before: Path, after: Path) -> dict:
    mb, ma = (json.loads((p / "manifest.json").read_text()) for p in (before, after))
    fb, fa = files_of(mb), files_of(ma)
    same = sorted(p for p in fb if fa.get(p) == fb[p])
    packages = [p for p in fb if p.endswith(".mlpackage") and p in fa and p not in same]
    same_content = [p for p in packages
                    if package_content(before / p) == package_content(after / p)]
    return {"files": len(fb), "identical_files": len(same),
            "identical_package_content": len(same_content),
            "differing_files": sorted(set(fb) ^ set(fa) | {p for p in fb if p in fa and fa[p] != fb[p]
                                                         and p not in same_content}),
            "manifest_differences": [d for d in differences(_strip(mb), _strip(ma))
                                     if not _explained(d, same_content)]}


def _explained(difference: str, same_content: list[str]) -> bool:
    """A files entry that differs only by a package whose content is the same."""
    return difference.endswith(".files") and bool(same_content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="500b51a")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--kinds", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/layout-move"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    refs = {"before": args.before, "after": args.after}
    rows = []
    for kind in args.kinds:
        runs = {}
        for label, ref in refs.items():
            out = args.work / f"out-{label}-{kind}"
            report = out.with_suffix(".time")
            if not (args.reuse and (out / "manifest.json").is_file() and report.is_file()):
                start = time.time()
                report = export(checkout(ref, args.work), kind, out)
                print(f"{kind} {label}: {time.time() - start:.0f} s")
            runs[label] = measured(report)
        cmp = compare(args.work / f"out-before-{kind}", args.work / f"out-after-{kind}")
        row = {"export": f"make export-{kind}"}
        for label in refs:
            row.update({f"{k}_{label}": v for k, v in runs[label].items()})
        row["cpu_ratio"] = round(runs["after"]["cpu_s"] / runs["before"]["cpu_s"], 3)
        row["rss_ratio"] = round(runs["after"]["peak_rss_gb"] / runs["before"]["peak_rss_gb"], 3)
        row.update(files=cmp["files"], identical_files=cmp["identical_files"],
                   identical_package_content=cmp["identical_package_content"],
                   differing_files=", ".join(cmp["differing_files"]) or "none",
                   manifest_differences=", ".join(cmp["manifest_differences"]) or "none")
        rows.append(row)
    columns = [("export", "export"), ("wall_s_before", "wall s before"),
               ("wall_s_after", "wall s after"), ("cpu_s_before", "CPU s before"),
               ("cpu_s_after", "CPU s after"), ("cpu_ratio", "CPU after/before"),
               ("peak_rss_gb_before", "peak RSS GB before"),
               ("peak_rss_gb_after", "peak RSS GB after"), ("files", "files"),
               ("identical_files", "identical (sha256)"),
               ("identical_package_content", "packages with identical content"),
               ("differing_files", "differing"),
               ("manifest_differences", "manifest differences (volatile fields left out)")]
    write_results("layout_move", rows, columns,
                  "The layout move: same full-size exports before and after", [
                      f"before = {args.before}, after = {args.after}; full-size snapfusion, "
                      "seeded random weights; one export at a time"
                      + (" (runs reused from --work: all 'before' runs, then all 'after' runs)"
                         if args.reuse else ", before and after interleaved")
                      + "; CPU seconds (user + system) are the stable measure on a shared "
                      "machine, wall time moves with the load of other jobs.",
                      "ETRecords (.etrecord) differ from run to run of the same commit too (zip "
                      "timestamps, graph ids): not a layout effect.",
                      "Volatile manifest fields left out of the comparison: "
                      + ", ".join(sorted(VOLATILE)) + ".",
                      "A Core ML package never has the same bytes twice (coremltools writes a "
                      "random UUID per item into its Manifest.json and the metadata map in no "
                      "fixed order): packages are compared by content (weights + spec "
                      "serialized deterministically).",
                      "recipe.<key> (only before): the manifest records the recipe as its "
                      "YAML holds it; since recipes have one options group per format, a Core ML "
                      "recipe no longer carries the ExecuTorch / ONNX defaults (and vice versa)."],
                  extra={"refs": refs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Parity of the full-size default exports, every backend that runs on this host.

Usage: ``.venv/bin/python benchmarks/parity_table.py [DIR ...] [--spec snapfusion]``
(default dirs: ``artifacts/android``, ``artifacts/onnx``, ``artifacts/ios``, those that exist:
``make export-android`` / ``make export-ios`` write them). Each folder is checked by
``mobile-sd parity`` in its own process, one at a time (full-size models: one job at a time on
a shared machine); its report goes to ``benchmarks/results/parity/<dir>/``. Writes
``benchmarks/results/parity_table.{json,md}``: one row per component and one end-to-end row per
export, rendered from the reports' data.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import _common  # noqa: F401  (sets sys.path)
from _common import RESULTS, ROOT, write_results

DEFAULT_DIRS = ("artifacts/android", "artifacts/onnx", "artifacts/ios")
COLUMNS = [("artifact", "export"), ("component", "component"), ("file", "file"),
           ("runtime", "runtime"), ("precision", "precision"), ("status", "status"),
           ("fp32_psnr_db", "PSNR vs fp32 (dB)"), ("gate_db", "gate (dB)"),
           ("lowering_psnr_db", "PSNR vs eager same precision (dB)"), ("sqnr_db", "SQNR (dB)"),
           ("one_minus_cosine", "1 - cosine"), ("max_abs", "max abs"), ("ssim", "SSIM (e2e)"),
           ("inputs", "inputs"), ("seconds", "s"), ("note", "note")]


def run_one(folder: Path, spec: str, prompts: list[str], threads: int | None) -> dict | None:
    """``mobile-sd parity`` on one folder (own process); returns its report, None on error."""
    out = RESULTS / "parity" / folder.name
    cmd = [str(ROOT / ".venv" / "bin" / "mobile-sd"), "parity", str(folder), "--spec", spec,
           "--out", str(out), "--quiet", "--prompts", *prompts]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode == 2:
        print((proc.stderr.strip().splitlines() or ["mobile-sd parity: error"])[-1], file=sys.stderr)
        return None
    return json.loads((out / "parity.json").read_text())


def rows_for(report: dict) -> list[dict]:
    """Table rows (components, then end to end) from one parity report."""
    name, rows = Path(report["artifact"]["path"]).name, []
    for comp, entry in report["components"].items():
        fp32 = entry.get("tiers", {}).get("fp32", {})
        low = entry.get("tiers", {}).get("lowering", {})
        worst = fp32.get("worst") or {}
        loc = entry.get("locator") or {}
        rows.append({"artifact": name, "component": comp,
                     "file": ", ".join(f["path"] for f in entry.get("files", [])
                                       if f.get("format") in ("pte", "onnx", "mlpackage")),
                     "runtime": entry.get("runtime"), "precision": entry.get("precision"),
                     "status": entry["status"], "fp32_psnr_db": worst.get("psnr_db"),
                     "gate_db": fp32.get("gate_min_psnr_db"),
                     "lowering_psnr_db": (low.get("worst") or {}).get("psnr_db"),
                     "sqnr_db": worst.get("sqnr_db"),
                     "one_minus_cosine": None if not worst else 1.0 - worst["cosine"],
                     "max_abs": worst.get("max_abs"),
                     "inputs": sum(entry.get("inputs", {}).values()) or None,
                     "seconds": entry.get("seconds"),
                     "note": entry.get("reason") or loc.get("module") or low.get("reason")})
    e2e = report["e2e"]
    rows.append({"artifact": name, "component": "end to end", "status": e2e["status"],
                 "fp32_psnr_db": e2e.get("min_psnr_db"), "gate_db": e2e.get("gate_min_psnr_db"),
                 "ssim": e2e.get("min_ssim"), "inputs": len(e2e.get("prompts", [])) or None,
                 "note": e2e.get("reason")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--spec", default="snapfusion")
    parser.add_argument("--prompts", nargs="+",
                        default=["a photo of an astronaut riding a horse on mars",
                                 "a watercolor painting of a lighthouse at dawn"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    dirs = args.dirs or [ROOT / d for d in DEFAULT_DIRS if (ROOT / d / "manifest.json").is_file()]
    if not dirs:
        sys.exit("no export folders: run `make export-android export-ios` first (full size)")
    reports = [r for r in (run_one(Path(d), args.spec, args.prompts, args.threads) for d in dirs) if r]
    rows = [row for report in reports for row in rows_for(report)]
    notes = ["PSNR as in Apple's ml-stable-diffusion: peak = max |reference|; the worst input "
             "over 2 random input sets and the real pipeline inputs (every step, both CFG "
             "branches) of the prompts below.",
             "End to end: final 8-step images vs the fp32 PyTorch pipeline, PSNR (range 255) "
             "and SSIM; the worst prompt.",
             "Skipped rows could not run on this host (reason in the note), never passes.",
             f"Prompts: {'; '.join(args.prompts)}. Model: spec {args.spec} (seeded random weights)."]
    path = write_results("parity_table", rows, COLUMNS, "Parity of the default exports", notes,
                         extra={"reports": [r["files"].get("json") for r in reports]})
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

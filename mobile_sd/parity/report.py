"""The parity report: ``parity.json`` (the data), ``parity.md`` (rendered from it), the image
grid, and one terminal line per artifact.

``parity.json`` (``schema: mobile-sd/parity/v1``)::

    {"schema", "created", "tool_versions", "machine", "git_sha",
     "artifact": {"path", "format", "backend", "recipe", "manifest_sha256", "model"},
     "reference": {"model", "spec"},
     "settings": {"prompts", "seed", "random_inputs", "steps", "guidance", "latent_size",
                  "coreml_mode"},
     "components": {name: {"status": "pass"|"fail"|"skip", "reason"?, "runtime", "precision",
                           "files": [{"path", "format", "backend", "bytes", "sha256"}],
                           "tiers": {"lowering": {...}, "fp32": {...}}, "inputs", "locator"?}},
     "e2e": {"status", "gate_min_psnr_db", "min_psnr_db", "min_ssim", "prompts": [...]},
     "summary": {"status", "passed", "failed", "skipped"}, "files": {...}}
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "mobile-sd/parity/v1"
STATUSES = ("pass", "fail", "skip")
_REQUIRED = ("schema", "created", "tool_versions", "artifact", "components", "e2e", "summary")


def new_report(folder: Path, manifest, model, settings: dict) -> dict:
    """The report skeleton with provenance (tools, machine, git sha, manifest hash)."""
    from mobile_sd.utils.env import git_sha, machine_info, tool_versions
    from mobile_sd.utils.files import sha256_file

    return {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool_versions": tool_versions(), "machine": machine_info(), "git_sha": git_sha(),
            "artifact": {"path": str(folder), "format": manifest.format,
                         "backend": manifest.backend, "recipe": manifest.recipe.get("name"),
                         "manifest_sha256": sha256_file(Path(folder) / "manifest.json"),
                         "model": manifest.model, "exported": manifest.created,
                         # what the export itself could not do or verify here
                         "export_skipped": manifest.skipped},
            "reference": {"model": model.source, "spec": model.spec.name},
            "settings": settings, "components": {}, "e2e": {"status": "skip", "reason": "not run"},
            "summary": {}, "files": {}}


def summarize(report: dict) -> dict:
    """Fill ``summary``: fail if anything failed; pass if something passed and nothing failed;
    skip when nothing could run here (never counted as a pass)."""
    statuses = [c["status"] for c in report["components"].values()] + [report["e2e"]["status"]]
    if "swift_app" in report:   # Swift-app bundles: the app emulated on the bundle's files
        statuses.append(report["swift_app"]["status"])
    counts = {s: statuses.count(s) for s in STATUSES}
    overall = "fail" if counts["fail"] else ("pass" if counts["pass"] else "skip")
    report["summary"] = {"status": overall, "passed": counts["pass"], "failed": counts["fail"],
                         "skipped": counts["skip"]}
    return report["summary"]


def validate_report(data: dict) -> None:
    """Raise ValueError if ``data`` is not a parity report of this schema version."""
    missing = [k for k in _REQUIRED if k not in data]
    if missing or data.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} report (schema {data.get('schema')!r}, missing {missing})")
    for name, comp in data["components"].items():
        if comp.get("status") not in STATUSES:
            raise ValueError(f"component {name}: status {comp.get('status')!r} not in {STATUSES}")
        if comp["status"] == "skip" and not comp.get("reason"):
            raise ValueError(f"component {name} is skipped without a reason")


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``parity.json`` and ``parity.md`` into ``out_dir`` (the grid is written by e2e)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "parity.json", "markdown": out / "parity.md"}
    report["files"].update({k: shown(p) for k, p in paths.items()})
    validate_report(report)
    paths["json"].write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    return paths


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _db(tier: dict | None) -> str:
    if not tier:
        return "-"
    if str(tier.get("reason", "")).startswith("n/a:"):   # eager.NOT_APPLICABLE
        return "n/a"
    if tier.get("status") == "skip" or "worst" not in tier:
        return "skipped"
    return f"{tier['worst']['psnr_db']:.1f} (>= {tier['gate_min_psnr_db']:g})"


def _where(comp: dict) -> str:
    loc = comp.get("locator") or {}
    if loc.get("module"):
        return f"`{loc['module']}`"
    return loc.get("reason", "")


def render_markdown(report: dict) -> str:
    """A Markdown page rendered from the report data (never typed by hand)."""
    art, summary = report["artifact"], report["summary"]
    lines = [f"# Parity: `{art['path']}`", "",
             f"{art['format']}/{art['backend']}, recipe `{art['recipe']}`, reference "
             f"{report['reference']['model']}. **{summary['status'].upper()}**: "
             f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped. "
             f"Generated {report['created']} (git {str(report['git_sha'])[:10]}).", "",
             "| component | file | runtime | status | lowering PSNR dB | fp32 PSNR dB | SQNR dB "
             "| cosine | max abs | inputs | first divergence / reason |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, comp in report["components"].items():
        files = ", ".join(f["path"] for f in comp.get("files", []) if f.get("format") in
                          ("pte", "onnx", "mlpackage", "mlmodelc"))
        fp32 = comp.get("tiers", {}).get("fp32", {})
        w = fp32.get("worst") or {}
        cells = [name, files, comp.get("runtime", ""), comp["status"].upper(),
                 _db(comp.get("tiers", {}).get("lowering")), _db(fp32),
                 f"{w['sqnr_db']:.1f}" if w else "-", f"{w['cosine']:.6f}" if w else "-",
                 f"{w['max_abs']:.3g}" if w else "-",
                 " + ".join(f"{v} {k}" for k, v in comp.get("inputs", {}).items()) or "-",
                 comp.get("reason") or _where(comp)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## End to end", ""] + _e2e_lines(report)
    if "swift_app" in report:
        lines += ["", "## Swift app (emulated on the bundle's files, MIL runtime)", ""]
        lines += _swift_app_lines(report["swift_app"])
    skipped = art.get("export_skipped") or []
    if skipped:
        lines += ["", "## Not verified at export", ""]
        lines += [f"- {s.get('step')}: {s.get('reason')}" for s in skipped]
    return "\n".join(lines) + "\n"


def _e2e_lines(report: dict) -> list[str]:
    e2e = report["e2e"]
    if "min_psnr_db" not in e2e:
        return [f"{e2e['status'].upper()}: {e2e.get('reason')}"]
    lines = [f"**{e2e['status'].upper()}**: min PSNR {e2e['min_psnr_db']:.2f} dB "
             f"(gate {e2e['gate_min_psnr_db']:g}), min SSIM {e2e['min_ssim']:.4f}"
             + (f"; eager (not exported): {', '.join(e2e['eager_components'])}"
                if e2e.get("eager_components") else ""), "",
             "| prompt | seed | PSNR dB | SSIM | max abs | mean abs |", "|---|---|---|---|---|---|"]
    for row in e2e["prompts"]:
        lines.append(f"| {row['prompt']} | {row['seed']} | {row['psnr_db']:.2f} | "
                     f"{row['ssim']:.4f} | {row['max_abs']:.0f} | {row['mean_abs']:.3f} |")
    if report["files"].get("grid"):
        grid = Path(report["files"]["grid"]).name
        lines += ["", f"![reference, export, amplified difference]({grid})"]
    return lines


def _swift_app_lines(app: dict) -> list[str]:
    if "min_psnr_db" not in app:
        return [f"{app['status'].upper()}: {app.get('reason')}"]
    lines = [f"**{app['status'].upper()}**: min image PSNR {app['min_psnr_db']:.2f} dB (gate "
             f"{app['gate_min_psnr_db']:g}) vs the fp32 pipeline with the app's scheduler; "
             f"min SSIM {app['min_ssim']:.4f}. App settings: `{app['settings']}`", "",
             "| prompt | seed | PSNR dB | SSIM | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['seed']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
              f"{r['seconds']:.1f} |" for r in app["prompts"]]
    return lines


def terminal_lines(report: dict) -> list[str]:
    """One line per artifact (component), one for the end-to-end run, one summary line."""
    lines = []
    for name, comp in report["components"].items():
        files = ",".join(Path(f["path"]).name for f in comp.get("files", [])
                         if f.get("format") in ("pte", "onnx", "mlpackage", "mlmodelc"))
        head = f"{comp['status'].upper():4s}  {name:12s} {files}"
        if "tiers" not in comp:  # skipped, or crashed on its runtime
            lines.append(f"{head}: {comp.get('reason')}")
            continue
        tiers = comp["tiers"]
        detail = f"fp32 {_db(tiers['fp32'])}, lowering {_db(tiers['lowering'])}"
        n = sum(comp.get("inputs", {}).values())
        loc = f"; first divergence: {_where(comp)}" if comp.get("locator") else ""
        lines.append(f"{head} [{comp.get('runtime')} {comp.get('precision')}]: {detail}, "
                     f"{n} inputs{loc}")
    e2e = report["e2e"]
    if "min_psnr_db" not in e2e:
        lines.append(f"{e2e['status'].upper():4s}  e2e: {e2e.get('reason')}")
    else:
        lines.append(f"{e2e['status'].upper():4s}  e2e          {len(e2e['prompts'])} prompts: "
                     f"min PSNR {e2e['min_psnr_db']:.1f} dB (>= {e2e['gate_min_psnr_db']:g}), "
                     f"min SSIM {e2e['min_ssim']:.4f}")
    app = report.get("swift_app")
    if app and "min_psnr_db" in app:
        lines.append(f"{app['status'].upper():4s}  swift app    {len(app['prompts'])} prompts: "
                     f"min PSNR {app['min_psnr_db']:.1f} dB (>= {app['gate_min_psnr_db']:g}), "
                     f"DPM-Solver++ as the app sets it up")
    elif app:
        lines.append(f"{app['status'].upper():4s}  swift app: {app.get('reason')}")
    s = report["summary"]
    lines.append(f"parity {report['artifact']['path']}: {s['status'].upper()} ({s['passed']} passed, "
                 f"{s['failed']} failed, {s['skipped']} skipped); report: "
                 f"{report['files'].get('markdown', '-')}")
    return lines


def shown(path: str | Path) -> str:
    """A path as reports record it: relative to the working folder when inside it, so a
    committed report names no machine path."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)

"""Benchmark results as data (JSON lines) and the Markdown + PNG report rendered from them.

``bench.jsonl`` accumulates every run (one record per component file, see
:mod:`mobile_sd.bench.results`); :func:`render_report` rewrites ``bench.md`` and the plots
for the latest run, with a history table of the earlier ones. Nothing in the report is typed
by hand: change the data, re-render.

Example (not run by the tests: it needs real artifacts)::

    render_report(Path("bench/bench.jsonl"), Path("bench"))
    # -> {'markdown': PosixPath('bench/bench.md'), 'plots': [PosixPath('bench/bench_components.png')]}
"""
from __future__ import annotations

import json
from pathlib import Path

from mobile_sd.bench.results import append_results, load_results  # noqa: F401  (re-exported)


def latest_run(records: list[dict]) -> list[dict]:
    """Records of the run appended last."""
    if not records:
        return []
    run_id = records[-1].get("run_id")
    return [r for r in records if r.get("run_id") == run_id]


def budgets(run: list[dict]) -> list[dict]:
    """End-to-end estimate vs the paper for each format/backend variant of a run."""
    from mobile_sd.bench import budget

    pipe = next((r.get("pipeline") for r in run if r.get("pipeline")), None)
    if pipe is None:
        return []
    out = []
    for variant, rows in _variants(run).items():
        if not any(r["status"] == "ok" for r in rows):
            continue  # nothing measured in this variant (all skipped): no estimate to show
        per_call: dict[str, float] = {}
        batches: dict[str, int] = {}
        for r in rows:
            median = (r.get("stats") or {}).get("median_ms")
            batches.setdefault(r["component"], r.get("batch", 1))
            if r["status"] == "ok" and median is not None:
                per_call[r["component"]] = per_call.get(r["component"], 0.0) + median
        calls = budget.calls_per_image(pipe["steps"], pipe["cfg"],
                                       batches.get("text_encoder", 1), batches.get("unet", 1))
        est = budget.estimate(per_call, calls)
        out.append({"variant": variant, "pipeline": pipe, "estimate": est,
                    "compare": budget.compare(est)})
    return out


def _variants(run: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in run:
        units = (r.get("runtime") or {}).get("compute_units")
        key = "/".join(filter(None, [r.get("format"), r.get("backend"), units]))
        groups.setdefault(key, []).append(r)
    return groups


def render_report(jsonl: str | Path, out_dir: str | Path) -> dict:
    """Write ``bench.md`` and PNG plots for the latest run of ``jsonl`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, bad = load_results(jsonl)
    run = latest_run(records)
    run_budgets = budgets(run)
    plots = []
    if run_budgets:
        plots.append(plot_components(run_budgets, out_dir / "bench_components.png"))
    op_plots = {}
    for r in run:
        if r.get("op_table"):
            name = f"bench_ops_{r['component']}-{Path(r['file']).stem}.png"
            op_plots[id(r)] = plot_ops(r, out_dir / name)
            plots.append(op_plots[id(r)])
    text = markdown(run, records, run_budgets, op_plots, bad)
    path = out_dir / "bench.md"
    path.write_text(text)
    return {"markdown": path, "plots": plots}


# ----------------------------------------------------------------------------- Markdown
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _header(run: list[dict]) -> list[str]:
    first = run[0]
    dev = first.get("device") or {}
    versions = first.get("versions") or {}
    runtimes = sorted({f"{rt['name']} {rt.get('version') or ''}".strip()
                       for rt in (r.get("runtime") for r in run) if rt})
    recipe = first.get("recipe") or {}
    free = dev.get("free_storage_bytes")
    lines = [
        f"Run `{first.get('run_id')}` started {first.get('started')} on target "
        f"`{first.get('target')}` (mobile-sd git `{(first.get('git_sha') or '?')[:10]}`; "
        f"warm-up {first.get('warmup')}, timed iterations {first.get('iters')}).",
        "",
        f"- Device: {dev.get('model') or '-'}, {dev.get('os') or '-'}, "
        f"{dev.get('abi') or '-'}{', ' + dev['chip'] if dev.get('chip') else ''}"
        f"{', ' + dev['soc'] if dev.get('soc') else ''}"
        f"{f', {free / 2**30:.1f} GiB free' if free else ''}",
        f"- Runtimes measured: {', '.join(runtimes) or 'none'}; host tools: "
        + ", ".join(f"{k} {versions[k]}" for k in ("torch", "executorch", "onnxruntime",
                                                     "coremltools") if versions.get(k)),
        f"- Recipe: `{recipe.get('name', json.dumps(recipe)[:80]) if recipe else '-'}`; "
        f"artifacts: `{first.get('artifact_dir')}` (export git "
        f"`{(first.get('export_git_sha') or '?')[:10]}`)",
    ]
    return lines


def _results_table(run: list[dict]) -> list[str]:
    lines = ["| component | file | format | status | median ms | p90 ms | min ms | mean ms | n "
             "| load ms | peak RSS MB | notes |", "|" + "---|" * 12]
    for r in run:
        s = r.get("stats") or {}
        status = r["status"] + (" (partial)" if r.get("partial") else "")
        notes = r.get("reason") or r.get("note") or ""
        if r.get("aggregate_mean_ms") is not None:
            notes = f"mean incl. warm-up {r['aggregate_mean_ms']:.2f} ms; {notes}"
        variant = "/".join(filter(None, [r.get("format"), r.get("backend")]))
        lines.append(f"| {r['component']} | {r['file']} | {variant} | {status} | "
                     f"{_fmt(s.get('median_ms'))} | {_fmt(s.get('p90_ms'))} | "
                     f"{_fmt(s.get('min_ms'))} | {_fmt(s.get('mean_ms'))} | {s.get('n', 0)} | "
                     f"{_fmt(r.get('load_ms'), 1)} | {_fmt(r.get('peak_rss_mb'), 0)} | "
                     f"{notes.replace('|', '/').replace(chr(10), ' ')[:300]} |")
    return lines


def _budget_section(run_budgets: list[dict], has_pipeline: bool) -> list[str]:
    if not has_pipeline:
        return ["No end-to-end estimate: the manifest has no `pipeline` (steps, cfg)."]
    if not run_budgets:
        return ["No end-to-end estimate: no component was measured in this run."]
    paper = run_budgets[0]["compare"]["paper"]
    lines = [f"Paper: {paper['system']} on {paper['device']}; source: {paper['source']}.", ""]
    for b in run_budgets:
        pipe, comp = b["pipeline"], b["compare"]
        lines += [f"### {b['variant']}", "",
                  f"{pipe['steps']} steps, cfg `{pipe['cfg']}`: " + ", ".join(
                      f"{n} x{p['calls']}" for n, p in b["estimate"]["components"].items()), "",
                  "| component | calls | per call ms | per image ms | paper per call ms | "
                  "paper per image ms | measured / paper |", "|---|---|---|---|---|---|---|"]
        for name, part in b["estimate"]["components"].items():
            c = comp[name]
            lines.append(f"| {name} | {part['calls']} | {_fmt(c['per_call_ms'])} | "
                         f"{_fmt(c['per_image_ms'])} | {_fmt(c['paper_per_call_ms'])} | "
                         f"{_fmt(c['paper_per_image_ms'])} | {_fmt(c['ratio'], 3)} |")
        t = comp["total"]
        lines += [f"| **total** | | | **{_fmt(t['ms'])}** | | **{_fmt(t['paper_ms'])}** | "
                  f"**{_fmt(t['ratio'], 3)}** |", ""]
    return lines


def markdown(run: list[dict], records: list[dict], run_budgets: list[dict],
             op_plots: dict, bad_lines: int = 0) -> str:
    """The report text for ``run`` (latest run) with a history of all ``records``."""
    lines = ["# mobile-sd latency report", ""]
    if not run:
        return "\n".join(lines + ["No results.", ""])
    lines += _header(run) + ["", "## Per-component latency", ""] + _results_table(run)
    lines += ["", "Times are per call (one forward of the exported graph). `partial`: a fault "
              "stopped the run; the iterations that finished are kept.", "",
              "## End-to-end estimate", ""]
    lines += _budget_section(run_budgets, any(r.get("pipeline") for r in run))
    if run_budgets:
        lines += ["![per-component latency vs paper](bench_components.png)", ""]
    with_ops = [r for r in run if r.get("op_table")]
    if with_ops:
        lines += ["## Slowest ops (ETDump)", ""]
    for r in with_ops:
        lines += [f"### {r['component']} ({r['file']})", "", "| op | median ms | share |",
                  "|---|---|---|"]
        lines += [f"| {o['name']} | {o['median_ms']:.3f} | {o['share']:.1%} |"
                  for o in r["op_table"][:10]]
        if id(r) in op_plots:
            lines += ["", f"![top ops]({op_plots[id(r)].name})"]
        lines.append("")
    for r in run:
        placement = (r.get("placement") or {}).get("ops_per_device")
        if placement:
            lines += [f"Core ML placement of {r['file']}: " + ", ".join(
                f"{k} {v} ops" for k, v in sorted(placement.items())), ""]
    earlier = [r for r in records if r.get("run_id") != run[0].get("run_id")]
    if earlier:
        lines += ["## Earlier runs", "", "| started | target | device | component | file | "
                  "status | median ms |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('started')} | {r.get('target')} | "
                  f"{(r.get('device') or {}).get('model') or '-'} | {r['component']} | "
                  f"{r['file']} | {r['status']} | {_fmt((r.get('stats') or {}).get('median_ms'))}"
                  " |" for r in earlier[-50:]]
    if bad_lines:
        lines += ["", f"({bad_lines} unreadable line(s) in the results file were skipped.)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def plot_components(run_budgets: list[dict], path: Path) -> Path:
    """Grouped bars: per-image ms of each component and the total, per variant and paper."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    from mobile_sd.names import COMPONENT_NAMES

    names = [*COMPONENT_NAMES, "total"]
    series = [(b["variant"], [b["compare"][n]["per_image_ms"] for n in names[:3]]
               + [b["compare"]["total"]["ms"]], None) for b in run_budgets]
    comp = run_budgets[0]["compare"]
    series.append((f"paper ({comp['paper']['device']})",
                   [comp[n]["paper_per_image_ms"] for n in names[:3]]
                   + [comp["total"]["paper_ms"]], "//"))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    x, width = np.arange(len(names)), 0.8 / len(series)
    known = [v for _, values, _ in series for v in values if v]
    floor, top = min(known) / 2, max(known) * 3
    for k, (label, values, hatch) in enumerate(series):
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + k * width, heights, width, label=label, hatch=hatch,
                      edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7,
                     padding=2)
        for xi, v in zip(x + k * width, values):
            if v is None:  # say so rather than leave an ambiguous gap
                ax.text(xi, floor * 1.15, "n/a", ha="center", fontsize=7)
    ax.set_ylim(floor, top)
    ax.set_xticks(x + width * (len(series) - 1) / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (log)")
    ax.set_title("Per-component latency per image vs SnapFusion")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_ops(record: dict, path: Path, top: int = 15) -> Path:
    """Horizontal bars of the slowest ops of one ETDump."""
    from matplotlib.figure import Figure

    ops = record["op_table"][:top][::-1]
    fig = Figure(figsize=(8, 0.35 * len(ops) + 1.2), dpi=100)
    ax = fig.add_subplot()
    ax.barh([o["name"][:48] for o in ops], [o["median_ms"] for o in ops])
    ax.set_xlabel("median ms per call")
    ax.set_title(f"Slowest ops: {record['component']} ({record['file']}, {record['target']})")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path

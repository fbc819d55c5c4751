"""ANE lint: static checks of a Core ML ML Program for what keeps work off the Neural Engine.

Implements the rules of ``ane.md`` section 1 that a saved package (or an in-memory ``MLModel``
from ``ct.convert``) can decide without a Mac. Every finding is a **warning**: Core ML places ops
on device with a cost model that varies with chip and OS, and Apple publishes no op list, so a
finding says "look here", never "this op runs on the GPU". Confirm with ``MLComputePlan`` or
Xcode's performance report (ane.md section 2).

>>> report = lint_package("out/unet.mlpackage")            # doctest: +SKIP
>>> report.counts()["E9"], report.findings[0].rule          # doctest: +SKIP
(16, 'E1')
>>> Path("unet.lint.md").write_text(report.to_markdown())   # doctest: +SKIP

The rule table (:data:`RULES`, in ``ane_rules.py``) is data: id, severity, basis, the public
source exactly as in ane.md, what it means and what to do. The checks (``ane_checks.py``: E1-E10,
``ane_checks_ops.py``: compression, C1-C6, N1) read the MIL protobuf through
:class:`~mobile_sd.exporters.coreml_inspect.MilGraph`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from mobile_sd.exporters import ane_checks, ane_checks_ops
# RULES_BY_ID and Rule are re-exported: the rule table is part of the lint's public API.
from mobile_sd.exporters.ane_rules import (HEADER_NOTE, NOT_CHECKED, RULES,  # noqa: F401
                                           RULES_BY_ID, WEIGHT_LIMIT_BYTES, Finding,
                                           LintOptions, Rule)
from mobile_sd.exporters.coreml_inspect import (MilGraph, load_graph, weight_bytes,
                                                weight_file_bytes)


@dataclass
class LintReport:
    """Findings of :func:`lint_package`, with per-rule counts and JSON / Markdown renderings."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    weight_bytes: int = 0
    weight_file_bytes: int = 0
    expect_fp16: bool = True

    def counts(self) -> dict[str, int]:
        """Findings per rule id, every rule listed (0 when clean)."""
        counts = {rule.id: 0 for rule in RULES}
        for finding in self.findings:
            counts[finding.rule] += 1
        return counts

    def by_rule(self, rule_id: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule_id]

    def to_dict(self) -> dict:
        """JSON-able: the model, the note, counts, findings and the rule table."""
        return {"model": self.model, "note": HEADER_NOTE, "expect_fp16": self.expect_fp16,
                "weight_bytes": self.weight_bytes, "weight_file_bytes": self.weight_file_bytes,
                "counts": self.counts(), "findings": [f.to_dict() for f in self.findings],
                "rules": [asdict(rule) for rule in RULES], "not_checked": dict(NOT_CHECKED)}

    def to_markdown(self, max_per_rule: int = 10) -> str:
        """A rule table (with sources) and the findings, at most ``max_per_rule`` per rule."""
        counts = self.counts()
        lines = [f"# ANE lint: {self.model}", "", f"**{HEADER_NOTE}**", "",
                 "| rule | warnings | severity | basis | source | meaning | what to do |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.id} | {counts[r.id]} | {r.severity} | {r.basis} | {r.source} | "
                  f"{r.explanation} | {r.action} |" for r in RULES]
        lines += ["", f"Weights: {self.weight_bytes:,} bytes in ops, {self.weight_file_bytes:,} "
                  "bytes in weight files.", "", "Not decided statically: "
                  + "; ".join(f"{k}: {v}" for k, v in NOT_CHECKED.items()) + "."]
        for rule in (r for r in RULES if counts[r.id]):
            found = self.by_rule(rule.id)
            lines += ["", f"## {rule.id} ({len(found)})", "", "| op | type | severity | detail |",
                      "|---|---|---|---|"]
            lines += [f"| `{f.op_name}` | {f.op_type} | {f.severity} | "
                      f"{f.detail.replace('|', '&#124;')} |" for f in found[:max_per_rule]]
            if len(found) > max_per_rule:
                lines.append(f"| ... | | | {len(found) - max_per_rule} more |")
        return "\n".join(lines) + "\n"


def lint_package(model: Any, *, expect_fp16: bool = True,
                 weight_limit_bytes: int = WEIGHT_LIMIT_BYTES) -> LintReport:
    """Lint a ``.mlpackage`` path, an in-memory ``MLModel`` (before saving) or a spec.

    ``expect_fp16=False`` skips E1 for models that are fp32 on purpose.
    """
    graph = load_graph(model)
    options = LintOptions(expect_fp16, weight_limit_bytes)
    report = LintReport(model=graph.label, weight_bytes=weight_bytes(graph),
                        weight_file_bytes=weight_file_bytes(graph), expect_fp16=expect_fp16)
    for check in _CHECKS:
        report.findings.extend(check(graph, options, report))
    return report



Check = Callable[[MilGraph, LintOptions, LintReport], Iterator[Finding]]

_CHECKS: tuple[Check, ...] = (*ane_checks.CHECKS, *ane_checks_ops.CHECKS)

"""The ANE lint's findings for one package, with JSON and Markdown renderings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mobile_sd.export.coreml.ane.rules import HEADER_NOTE, NOT_CHECKED, RULES, Finding


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

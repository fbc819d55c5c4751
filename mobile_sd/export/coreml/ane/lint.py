"""ANE lint: static checks of a Core ML ML Program for what keeps work off the Neural Engine.

Implements the rules of ``ane.md`` section 1 that a saved package (or an in-memory ``MLModel``
from ``ct.convert``) can decide without a Mac. Every finding is a **warning**: Core ML places ops
on device with a cost model that varies with chip and OS, and Apple publishes no op list, so a
finding says "look here", never "this op runs on the GPU". Confirm with ``MLComputePlan`` or
Xcode's performance report (ane.md section 2).

Example (not run by the tests: it needs real artifacts)::

    report = lint_package("out/unet.mlpackage")
    report.counts()["E9"], report.findings[0].rule
    # -> (16, 'E1')
    Path("unet.lint.md").write_text(report.to_markdown())

The rule table (:data:`RULES`, in ``ane_rules.py``) is data: id, severity, basis, the public
source exactly as in ane.md, what it means and what to do. The checks (``ane_checks.py``: E1-E10,
``ane_checks_ops.py``: compression, C1-C6, N1) read the MIL protobuf through
:class:`~mobile_sd.export.coreml.inspect.MilGraph`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from mobile_sd.export.coreml.ane import checks as ane_checks, checks_ops as ane_checks_ops
# RULES_BY_ID and Rule are re-exported: the rule table is part of the lint's public API.
from mobile_sd.export.coreml.ane.rules import (HEADER_NOTE, NOT_CHECKED, RULES,  # noqa: F401
                                           RULES_BY_ID, WEIGHT_LIMIT_BYTES, Finding,
                                           LintOptions, Rule)
from mobile_sd.export.coreml.ane.report import LintReport
from mobile_sd.export.coreml.inspect import (MilGraph, load_graph, weight_bytes,
                                                weight_file_bytes)


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

"""``memscan audit``: candidates → triage → adaptive extraction within a budget → verification → report.

:func:`audit` runs every stage into one run directory (kind ``audit``); see :mod:`memscan.audit.run`.
"""

from memscan.audit.budget import AuditBudget, full_budget
from memscan.audit.run import AuditResult, audit, default_extract_config

__all__ = ["AuditBudget", "AuditResult", "audit", "default_extract_config", "full_budget"]

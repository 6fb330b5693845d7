"""Visual report of a curation + training run (``report/index.html`` plus PNG figures)."""
from demo.report.html import write_report

__all__ = ["write_report"]

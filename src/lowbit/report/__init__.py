"""Reports of evaluation records: terminal table, JSON, Markdown and a self-contained HTML page.

>>> from lowbit.report import write_report, summary, text_table  # doctest: +SKIP
"""

from lowbit.report.table import markdown_table, rows_of, summary, text_table
from lowbit.report.writer import FILES, report_json, write_report

__all__ = ["FILES", "markdown_table", "report_json", "rows_of", "summary", "text_table", "write_report"]

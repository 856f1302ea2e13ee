"""Results rows and tables (pandas), W&B logging."""

from wanexp.report.results import RESULTS_CSV, read_rows, write_row

__all__ = ["RESULTS_CSV", "read_rows", "write_row"]

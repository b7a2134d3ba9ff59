"""Results: typed run records (one schema), the run folder, and what people read."""

from fedkd.results.records import (
    SCHEMA,
    ClientRecord,
    FailureRecord,
    Outcome,
    RoundRecord,
    RunSummary,
    SchemaError,
    Stats,
    read_rounds,
    read_summary,
)
from fedkd.results.report import plot_accuracy, progress_line, summary_table
from fedkd.results.rundir import RunDirectory, atomic_write_bytes, atomic_write_text

__all__ = [
    "SCHEMA",
    "ClientRecord",
    "FailureRecord",
    "Outcome",
    "RoundRecord",
    "RunDirectory",
    "RunSummary",
    "SchemaError",
    "Stats",
    "atomic_write_bytes",
    "atomic_write_text",
    "plot_accuracy",
    "progress_line",
    "read_rounds",
    "read_summary",
    "summary_table",
]

"""The files a run leaves behind and the statuses its summary can have (no imports: cheap)."""

from __future__ import annotations

__all__ = [
    "ENVIRONMENT_FILE",
    "PLOTS_DIR",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STATUS_OK",
    "SUMMARY_FILE",
]

SUMMARY_FILE = "summary.json"
ENVIRONMENT_FILE = "environment.json"
PLOTS_DIR = "plots"

# A summary's `status`: the run finished; training stopped early (what was trained is measured);
# the run raised (the error instead of metrics).
STATUS_OK = "ok"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"

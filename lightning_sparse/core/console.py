"""Text for the user: printed on stdout and, inside a run, kept in its log file too."""

from __future__ import annotations

import logging

__all__ = ["ECHO_LOGGER", "echo"]

# The logger that carries printed text to the run's log file; `run.console.setup_job_output`
# gives it the file's handler (and no console handler: the text is printed already). Outside a
# run it has no handler, and its INFO records go nowhere.
ECHO_LOGGER = "lightning_sparse.echo"


def echo(text: str) -> None:
    """Print ``text`` (flushed, so a pipe sees it at once) and log it to the run's log file."""
    print(text, flush=True)
    logging.getLogger(ECHO_LOGGER).info(text)

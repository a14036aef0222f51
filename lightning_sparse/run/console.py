"""What a job shows: quiet of known noise, the same text on the console and in the run's log.

Hydra gives every job a log file (``<run dir>/<task>.log``: ``train.log``, ``oneshot.log``, ...)
fed by the root logger. :func:`setup_job_output` makes it hold what the job prints: Lightning's
messages and Python warnings go through the root logger (console and file); tables and progress
lines, which are printed rather than logged, are written to the file too, through
:data:`~lightning_sparse.core.console.ECHO_LOGGER`. Lightning's advertisements and messages that
only restate the configuration are dropped.
"""

from __future__ import annotations

import io
import logging
import re
import warnings

from rich.console import Console, RenderableType

from lightning_sparse.core.console import ECHO_LOGGER

__all__ = [
    "NOISE",
    "ConsoleFormatter",
    "quiet_known_noise",
    "setup_job_output",
    "show",
    "show_line",
]

# Lightning messages that carry nothing for a user of this package: advertisements, restatements
# of the config (`limit_*_batches`), and notes about how Lightning does its own bookkeeping.
NOISE = (
    re.compile(r"^💡 Tip:"),
    re.compile(r"^`Trainer\(limit_\w+_batches=[^)]*\)` was configured so"),
    re.compile(r"^Trainer already configured with model summary callbacks"),
    re.compile(r"^Loading `train_dataloader` to estimate number of stepping batches"),
)
# Lightning's own console handlers (on `lightning`, and on its subpackages when they are imported
# before logging is set up), which would print every message a second time under Hydra.
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Loggers whose records the filters see: Lightning logs through its rank-zero helpers.
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in NOISE)


class ConsoleFormatter(logging.Formatter):
    """The console's format: a message alone, or ``WARNING: message`` for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {text}"
        return text


def quiet_known_noise() -> None:
    """Drop Lightning's ads and config restatements, and a deprecation warning from inside it."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    # Raised inside Lightning's pytree helper (lightning 2.6, torch 2.14); nothing to fix here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def setup_job_output() -> None:
    """Route a Hydra job's output into its log file too, and quiet the known noise.

    Under Hydra (the root logger has handlers): Lightning's loggers propagate to the root (they
    print through their own handler only when imported before Hydra set up logging), Python
    warnings are logged, and ``echo``'s text reaches the log file. Outside Hydra nothing
    changes but the noise filters.
    """
    quiet_known_noise()
    root = logging.getLogger()
    echo_logger = logging.getLogger(ECHO_LOGGER)
    echo_logger.propagate = False  # printed already; only the file should get it again
    echo_logger.setLevel(logging.INFO)
    for handler in list(echo_logger.handlers):
        echo_logger.removeHandler(handler)
    if not root.handlers:
        return
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            echo_logger.addHandler(handler)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def show(renderable: RenderableType, console: Console | None = None) -> None:
    """Print a rich renderable (a table) and write its plain text to the run's log file."""
    console = console or Console()
    console.print(renderable)
    buffer = io.StringIO()
    Console(file=buffer, width=console.width, color_system=None, force_terminal=False).print(
        renderable
    )
    logging.getLogger(ECHO_LOGGER).info(buffer.getvalue().rstrip("\n"))


def show_line(text: str, console: Console | None = None) -> None:
    """Print one line whole, never wrapped or cut (a path to copy), and log it to the run's log."""
    (console or Console()).print(text, soft_wrap=True, markup=False, highlight=False)
    logging.getLogger(ECHO_LOGGER).info(text)

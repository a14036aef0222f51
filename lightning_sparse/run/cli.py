"""What the entry points share before any work: the config dir, composition, and how errors end.

This module imports Hydra, OmegaConf and the standard library only (no torch, no Lightning), so an
entry point that imports nothing else answers ``--help`` and a misspelled override in well under a
second; the job itself imports the rest when it starts.

Errors: an error in what the user asked for (a config value, a path, a recipe field) ends the run
with its message alone on stderr and exit code 1 (:func:`exit_on_user_error`); the traceback goes
to the run's log file (``<run dir>/<task>.log``), and ``HYDRA_FULL_ERROR=1`` prints it as Hydra
would. Anything else (a bug) keeps Hydra's report with its traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

__all__ = [
    "compose_config",
    "config_dir",
    "exit_on_user_error",
    "first_job_overrides",
    "full_error_requested",
    "log_traceback",
    "misspelled_key",
    "null_group",
    "precheck_command_line",
    "user_message",
]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """The Hydra config directory: inside the package when installed, else at the repo's top."""
    bundled = _PACKAGE_DIR / "conf"  # a wheel carries conf/ inside the package (pyproject.toml)
    return bundled if bundled.is_dir() else _PACKAGE_DIR.parent / "conf"


@contextmanager
def _own_hydra(job_name: str) -> Iterator[None]:
    """Initialise Hydra on our config dir, even inside another Hydra app, and restore it after."""
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    if outer is not None:
        global_hydra.clear()
    try:
        with initialize_config_dir(str(config_dir()), job_name=job_name, version_base="1.3"):
            yield
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    """Compose the shipped configs outside a Hydra app (tests, notebooks, scripts).

    Args:
        overrides: Hydra command-line overrides, e.g. ``["recipe=gmp", "trainer.max_epochs=5"]``.
        config_name: the primary config in ``conf/``.
        return_hydra_config: keep the ``hydra`` node (needed to set ``HydraConfig`` by hand).

    Example::

        cfg = compose_config(["data=synthetic", "recipe.pruning.final_sparsity=0.8"])
    """
    with _own_hydra(job_name="lightning_sparse"):
        return compose(
            config_name=config_name,
            overrides=list(overrides),
            return_hydra_config=return_hydra_config,
        )


# --------------------------------------------------------------------------------------------
# Misspelled keys, found before Hydra composes the run


# Flags after which the command line is not a run (Hydra answers them itself), or whose configs
# are not ours to look into.
_NOT_A_RUN = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
}
_CONFIG_NAME_FLAGS = ("-cn", "--config-name")
# A plain `dotted.key=value` override: no `+`, `++` or `~`, so a missing key is an error.
_VALUE_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=")
_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _split_command_line(argv: Sequence[str], config_name: str) -> tuple[str, list[str]] | None:
    """The config name and the overrides of a command line; None when it is not a plain run."""
    overrides: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        flag = arg.split("=", 1)[0]
        if flag in _NOT_A_RUN:
            return None
        if flag in _CONFIG_NAME_FLAGS:
            if "=" in arg:
                config_name = arg.split("=", 1)[1]
            elif index + 1 < len(args):
                config_name = args[index + 1]
                index += 1
        elif not arg.startswith("-") and "=" in arg:
            overrides.append(arg)
        index += 1
    return config_name, overrides


def first_job_overrides(overrides: Sequence[str]) -> list[str] | None:
    """The overrides of a sweep's first job (``a=1,2`` -> ``a=1``); None if they do not parse.

    A sweep that only a sweeper plugin expands (``interval(...)``) gives None too.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        first = []
        for override in parsed:
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    return None
                value = next(iter(override.sweep_string_iterator()))
                first.append(f"{override.get_key_element()}={value}")
            else:
                first.append(override.input_line or "")
        return first
    except (HydraException, StopIteration, ValueError):
        return None


def misspelled_key(override: str, others: Sequence[str], config_name: str = "train") -> str | None:
    """Our message for ``override`` when it names a key the composed config lacks, else None.

    The config is composed with ``others`` (the rest of the command line); the first component of
    the key that is missing is compared with the keys beside it, and the closest is suggested,
    ahead of Hydra's hint to add a new key with ``+``.
    """
    key, _, value = override.partition("=")
    try:
        cfg = compose_config(others, config_name=config_name)
    except (HydraException, ValueError):
        return None
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part in node:
            node = node[part]
            continue
        where = ".".join(parts[:depth]) or "the config"
        keys = [str(k) for k in node if not str(k).startswith("_")]
        close = difflib.get_close_matches(part, keys, n=1)
        guess = f" Did you mean {'.'.join([*parts[:depth], close[0]])!r}?" if close else ""
        listing = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
        return (
            f"`{key}`: {where} has no key {part!r}.{guess} Keys there: {listing}. "
            f"(To add a key the config lacks, write +{key}={value}.)"
        )
    return None


def null_group(override: str) -> str | None:
    """Our message for ``group=null`` (``recipe=null``), which Hydra refuses with a ValueError that
    names neither the group nor its options; None for any other override."""
    key, _, value = override.partition("=")
    key = key.lstrip("+")
    # hydra/...: Hydra's groups hold options of Hydra's own (basic) beside the ones shipped here.
    if value.strip().lower() != "null" or "." in key or key.startswith("hydra/"):
        return None
    group = config_dir() / key
    if not group.is_dir():
        return None
    choices = sorted(path.stem for path in group.glob("*.yaml"))
    hint = " (`recipe=dense` trains with no compression)" if key == "recipe" else ""
    return (
        f"`{override}`: {key} is a config group; choose one of its options: "
        f"{', '.join(choices)}{hint}."
    )


def precheck_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Catch a misspelled ``key=value`` (or a null config group, :func:`null_group`) before Hydra
    composes the run; print our hint and exit 1.

    Hydra's own message for a key the config lacks suggests adding it with ``+``, which for a typo
    (``recipe.pruning.final_sparsty=0.9``) is the wrong fix. This composes the command line's
    first job once (only when it has dotted ``key=value`` overrides) and, when that fails on a
    missing key, names the closest existing key. Anything else is left to Hydra.
    """
    split = _split_command_line(sys.argv[1:] if argv is None else argv, config_name)
    if split is None:
        return
    config_name, overrides = split
    null = next(filter(None, map(null_group, overrides)), None)
    if null is not None:
        print(null, file=sys.stderr)
        sys.exit(1)
    if not any(_VALUE_OVERRIDE.match(o) for o in overrides):
        return
    first = first_job_overrides(overrides)
    if first is None:
        return
    try:
        compose_config(first, config_name=config_name)
        return
    except ConfigCompositionException as err:
        failed = _COULD_NOT_OVERRIDE.search(str(err))
    except (HydraException, ValueError):
        return
    if failed is None:
        return
    key = failed.group(1)
    override = next((o for o in first if o.split("=", 1)[0] == key), None)
    if override is None:
        return
    message = misspelled_key(override, [o for o in first if o is not override], config_name)
    if message is not None:
        print(message, file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# Errors: the user's end with their message, a bug with its traceback

# Exceptions that, raised by this package's own code, are its validation speaking: a config value,
# a path or a recipe field the user gave. Their message says what is wrong and how to fix it.
_VALIDATION_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def full_error_requested() -> bool:
    """Whether ``HYDRA_FULL_ERROR`` asks for whole tracebacks (as Hydra reads it)."""
    return os.environ.get("HYDRA_FULL_ERROR", "0") not in ("", "0")


def _raised_here(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in this package."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def user_message(error: BaseException) -> str | None:
    """The message to show for an error in the user's input, or None for anything else.

    The user's errors: this package's validation (a ``ValueError`` or ``FileNotFoundError`` raised
    by its own code: ``RecipeError``, ``ResumeError``, ``ConfigError``,
    ``CheckpointMismatchError``, bad paths), the same raised inside a ``_target_`` Hydra built
    (named by its config key), and a mandatory config value left out or an interpolation that
    names a missing key.
    """
    if isinstance(error, InstantiationException):
        cause = error.__cause__
        inner = user_message(cause) if cause is not None else None
        if inner is None:
            return None
        where = re.search(r"full_key: (\S+)", str(error))
        return f"{where.group(1)}: {inner}" if where else inner
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "a value"
        return f"`{key}` is required and was not given: add {key}=<value> to the command line."
    if isinstance(error, InterpolationResolutionError):
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"`{error.full_key}`: {first_line}."
    if isinstance(error, _VALIDATION_ERRORS) and _raised_here(error):
        return str(error)
    return None


def _log_files() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_traceback(error: BaseException) -> None:
    """Write ``error`` with its traceback into the run's log file(s) only (not the console)."""
    text = "".join(traceback.format_exception(error))
    record = logging.LogRecord(
        "lightning_sparse", logging.ERROR, __file__, 0, "%s", (text.rstrip(),), None
    )
    for handler in _log_files():
        handler.handle(record)


def exit_on_user_error(error: BaseException) -> None:
    """End the process with ``error``'s message alone (exit code 1) if it is the user's.

    Returns (so that the caller re-raises) for any other error, and for every error when
    ``HYDRA_FULL_ERROR`` asks for the whole traceback. The traceback also goes to the run's log.
    """
    message = user_message(error)
    if message is None or full_error_requested():
        return
    log_traceback(error)
    _exit(message)


def _exit(message: str) -> NoReturn:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)

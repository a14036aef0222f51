"""Suite-wide settings.

One intra-op thread per process: the test models are tiny, so a second thread only adds
synchronisation, and on a shared 2-core machine it waits for other processes (measured: 9 ms vs
106 ms per step under load). Subprocesses (the app, DDP ranks) inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# `make test` runs the suite on two pytest-xdist workers (one per core). Each file stays on one
# worker (its module fixtures, e.g. a trained run, are built once), except the README's commands,
# which are runs of the app: those that use a run the README made before them (a trained run, a
# sweep, a converted recipe) stay together in the README's order, the others are spread one by one,
# last, to fill whichever worker is free. Files of whole runs go first, so the longest units start
# early (longest first keeps two workers finishing together).
#
# The scopes are given to xdist as a scheduler (its `pytest_xdist_make_scheduler` hook), not as
# `xdist_group` marks: with pytest 9, pytest-xdist 3.8's loadgroup no longer sees the marks (it
# renames `item._nodeid`, which pytest 9 no longer reads), so every test became its own unit and
# module fixtures were built on both workers.
_README = "tests/test_readme.py"
_FIRST = ("tests/e2e/", "tests/scripts/", "tests/examples/")
# A README command holding one of these uses what an earlier one made: same scope, same order.
# The README test's ids hold the whole command (tests/test_readme.py).
_README_GROUPS = {
    "runs/train/multirun/": "readme-sweep",
    "runs/train/": "readme-trained",
    "ckpt_path=...": "readme-trained",
    "my_conf": "readme-recipe-convert",
}


def scope(nodeid: str) -> str:
    """The unit one worker runs whole: a file, a group of README commands, or one command."""
    path = nodeid.split("::", 1)[0]
    if path != _README or "test_the_command_runs[" not in nodeid:
        return path
    for word, group in _README_GROUPS.items():
        if word in nodeid:
            return group
    return nodeid  # independent: spread


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    if path == _README:
        return 2 if scope(item.nodeid) == item.nodeid else 1
    return 0 if path.startswith(_FIRST) else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        items.sort(key=_rank)  # stable: files and tests keep their order within a rank


if importlib.util.find_spec("xdist") is not None:
    from xdist.scheduler import LoadScopeScheduling

    class _Scopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadScopeScheduling:
        # In the order collected (ranked above), not xdist's default of most tests first.
        config.option.loadscopereorder = False
        return _Scopes(config, log)

"""Suite-wide settings.

One intra-op thread per process: the test models are tiny, so a second thread only adds
synchronisation, and on a shared 2-core machine it waits for other processes (measured: 9 ms vs
106 ms per step under load). Subprocesses (the app, DDP ranks) inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# `make test` runs the suite on two pytest-xdist workers (one per core) with `--dist loadgroup`.
# Each file stays on one worker (its module fixtures, e.g. a trained run, are built once), except
# the README's commands, which are runs of the app: those that share a run the README made
# before them (a trained run, a sweep, a converted recipe) stay together in the README's order,
# the others are spread one by one, last, to fill whichever worker is free. Files of whole runs go
# first, so the longest units start early (longest first keeps two workers finishing together).
_README = "tests/test_readme.py"
_FIRST = ("tests/e2e/", "tests/scripts/", "tests/examples/")
# A README command holding one of these uses what an earlier one made: same group, same order.
_README_GROUPS = {
    "runs/train/multirun/": "readme-sweep",
    "runs/train/": "readme-trained",
    "ckpt_path=...": "readme-trained",
    "my_conf": "readme-recipe-convert",
}


def _group(item: pytest.Item) -> str | None:
    path = item.nodeid.split("::", 1)[0]
    if path != _README:
        return path
    command = getattr(item, "callspec", None) and item.callspec.params.get("command")
    if not isinstance(command, str):
        return _README  # the Python blocks run in order, in one test
    for word, group in _README_GROUPS.items():
        if word in command:
            return group
    return None  # independent: spread


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    if path == _README:
        return 2 if _group(item) is None else 1
    return 0 if path.startswith(_FIRST) else 1


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    items.sort(key=_rank)  # stable: files and tests keep their order within a rank
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))

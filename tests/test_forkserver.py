"""The tests' fork server runs a command as a fresh interpreter would (tests/forkserver.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forkserver

SCRIPT = """
import atexit, json, os, sys, threading, time
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread done")), daemon=False).start()
print(json.dumps({
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "extra": os.environ.get("FORKSERVER_TEST"),
    "on_path": os.environ.get("EXTRA_DIR", "") in sys.path,
    "main": __name__,
}))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "code":
    sys.exit(3)
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise RuntimeError("boom")
"""


def _both(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], ...]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    extra = tmp_path / "extra"
    extra.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "FORKSERVER_TEST": "yes",
        "EXTRA_DIR": str(extra),
        "PYTHONPATH": str(extra),
    }
    fresh = subprocess.run(
        [sys.executable, "script.py", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    forked = forkserver.run(["script.py", *args], tmp_path, env, timeout=60)
    return fresh, forked


@pytest.mark.parametrize(("how", "code"), [("ok", 0), ("code", 3), ("message", 1), ("raise", 1)])
def test_a_forked_run_is_a_fresh_interpreters_run(tmp_path: Path, how: str, code: int) -> None:
    fresh, forked = _both(tmp_path, how, "x y")
    assert fresh.returncode == forked.returncode == code
    assert fresh.stdout == forked.stdout  # argv, cwd, sys.path, env, atexit, threads joined
    assert '"extra": "yes"' in forked.stdout
    assert '"on_path": true' in forked.stdout
    assert "thread done" in forked.stdout
    assert forked.stdout.rstrip().endswith("atexit ran")
    assert forked.stderr.startswith("to stderr")
    if how == "message":
        assert forked.stderr.rstrip().endswith("a message")
    if how == "raise":
        assert "RuntimeError: boom" in forked.stderr
        assert "Traceback (most recent call last)" in forked.stderr


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        forkserver.run(["sleep.py"], tmp_path, {**os.environ, "PYTHONWARNINGS": "ignore"}, 2)
    assert caught.value.output == "started\n"
    # The server is free for the next command.
    after = forkserver.run(
        ["-m", "lightning_sparse.train", "--help"],
        tmp_path,
        {**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=60,
    )
    assert after.returncode == 0
    assert "train is powered by Hydra" in after.stdout


RANKS = """
import os, sys
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only

rank = int(os.environ["RANK"])
if sys.argv[1] == "fail" and rank == 0:
    sys.exit(3)
dist.init_process_group("gloo")  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
total = torch.tensor([rank + 1])
dist.all_reduce(total)
print(rank, os.environ["LOCAL_RANK"], dist.get_world_size(), int(total), rank_zero_only.rank)
dist.destroy_process_group()
"""


def test_ranks_start_as_torchrun_starts_them_and_join_one_group(tmp_path: Path) -> None:
    (tmp_path / "ranks.py").write_text(RANKS)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = forkserver.run_ranks(["ranks.py", "ok"], tmp_path, env, timeout=120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    # rank, local rank, world size, the all-reduced sum 1 + 2, and Lightning's rank_zero_only
    # rank, which Lightning reads from the environment when it is imported
    assert [r.stdout.split() for r in results] == [
        ["0", "0", "2", "3", "0"],
        ["1", "1", "2", "3", "1"],
    ]


def test_a_failed_rank_ends_the_ranks_waiting_for_it(tmp_path: Path) -> None:
    (tmp_path / "ranks.py").write_text(RANKS)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # rank 1 would wait for rank 0 in init_process_group for 30 minutes; the timeout is shorter,
    # so a rank left waiting would raise TimeoutExpired here
    results = forkserver.run_ranks(["ranks.py", "fail"], tmp_path, env, timeout=120)
    assert [r.returncode for r in results] == [3, -9]

"""``python -m lightning_sparse.<app> ...`` for tests, without paying the imports each time.

Every run of the app in a fresh interpreter spends 8-9 s importing (Lightning imports torchmetrics,
which imports torchvision, scipy and parts of transformers; the export imports torch.onnx and
onnxscript) before it does 1-10 s of work, and the suite runs the app ~80 times. :func:`run` sends
the command to a server process (one per test process) that has imported all of that once; it
forks, and the child runs the module as ``python -m`` would (``runpy``, ``__main__``, ``sys.argv``,
working directory, environment, stdout/stderr to files, exit code, atexit handlers), in its own
process group. A child is a copy of a process that only imported modules, so no state of one run
reaches the next. Commands that are not the app, or whose environment differs from the server's
in variables an interpreter reads at start-up, run in a fresh interpreter as before.
:func:`run_ranks` starts the ranks of a DDP command the way torchrun does, each from a server.

Written here because neither pytest nor pytest-xdist offers a pre-imported fork server.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What a training, one-shot and export run import, heaviest first.
PRELOAD = (
    "lightning_sparse.run.training",
    "lightning_sparse.oneshot",
    "lightning_sparse.data.digits",
    "lightning_sparse.deploy.export",
    "torch.export",
    "torch.onnx",
    "onnxscript",
    "onnxruntime",
    "hydra",
)
# Read by the interpreter or by a module at import time: a command whose value differs from the
# server's cannot be run in a forked child. (PYTHONPATH is redone in the child: see _child.)
STARTUP_VARIABLES = (
    "PYTHONWARNINGS",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    # Lightning's rank_zero_only reads a process's rank when lightning is imported.
    "RANK",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "JSM_NAMESPACE_RANK",
)


# ------------------------------------------------------------------------------------ server


def _exit_code(code: object) -> int:
    """What the interpreter exits with for ``SystemExit(code)`` (and prints, for a message)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _python_path(env: dict[str, str]) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _child(request: dict[str, Any]) -> None:
    """Run the module or script as ``python -m``/``python`` would, then exit as the interpreter
    does."""
    import runpy
    import traceback

    os.setsid()  # its own process group: a timeout kills it with everything it started
    os.chdir(request["cwd"])
    # sys.path as the interpreter would have built it: the working directory (`-m`) or the
    # script's folder first, then the command's PYTHONPATH in place of the server's.
    script = request.get("path")
    rest = sys.path[1:]
    for entry in _python_path(dict(os.environ)):
        if entry in rest:
            rest.remove(entry)
    first = os.path.dirname(script) if script else request["cwd"]
    sys.path[:] = [first, *_python_path(request["env"]), *rest]
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    sys.argv = [script or request["module"], *request["args"]]
    code = 0
    try:
        if script:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        # What the interpreter does at exit, in its order: threading's exit hooks (executors stop
        # their manager threads), joining non-daemon threads, then atexit handlers.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Read one JSON request per line on stdin; answer ``{"pid"}`` then ``{"returncode"}``."""
    import importlib

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing an import prints may reach the replies
    for module in PRELOAD:
        importlib.import_module(module)
    # A fork copies only the calling thread: the server must not hold others (torch starts its
    # worker threads on the first parallel operation, which the server never runs).
    assert threading.active_count() == 1, threading.enumerate()
    replies.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ------------------------------------------------------------------------------------ client


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._read(timeout=300)  # {"ready"}

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server exited ({self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        timeout: float,
        started: Callable[[int], None] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv``: ``["-m", module, *args]`` or ``[script, *args]``; ``started`` gets the
        child's pid (its process group) once it runs."""
        assert self.process.stdin is not None
        module, path = (argv[1], None) if argv[0] == "-m" else (None, str(Path(cwd, argv[0])))
        args = argv[2:] if module else argv[1:]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {
                "module": module,
                "path": path,
                "args": args,
                "cwd": str(cwd),
                "env": env,
                "stdout": str(out),
                "stderr": str(err),
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            if started is not None:
                started(pid)
            try:
                code = self._read(timeout)["returncode"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired(
                    [sys.executable, *argv], timeout, out.read_text(), err.read_text()
                ) from None
            return subprocess.CompletedProcess(
                [sys.executable, *argv],
                code,
                out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)


_servers: dict[tuple[tuple[str, str | None], ...], _Server] = {}


def _startup(env: dict[str, str]) -> tuple[tuple[str, str | None], ...]:
    return tuple((name, env.get(name)) for name in STARTUP_VARIABLES)


def run(
    argv: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    started: Callable[[int], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *argv], cwd, env, capture_output, text)``, faster.

    ``argv`` of the form ``-m lightning_sparse.<app> ...`` (or a ``tests.`` module) or
    ``<script>.py ...`` runs in a child of the fork server started for the same start-up
    environment; anything else in a fresh interpreter. ``started`` gets a forked child's pid.
    """
    env = dict(os.environ if env is None else env)
    app = len(argv) >= 2 and argv[0] == "-m" and argv[1].startswith(("lightning_sparse.", "tests."))
    script = bool(argv) and argv[0].endswith(".py") and Path(cwd, argv[0]).is_file()
    if not (app or script):
        return subprocess.run(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    key = _startup(env)
    server = _servers.get(key)
    if server is None or server.process.poll() is not None:
        server = _servers[key] = _Server(env)
    return server.run(argv, cwd, env, timeout, started)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_ranks(
    argv: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    world_size: int = 2,
    timeout: float = 300,
) -> list[subprocess.CompletedProcess[str]]:
    """``world_size`` ranks of one command on this machine, started as ``torchrun`` starts them.

    Each rank gets ``MASTER_ADDR``/``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``RANK`` and
    ``LOCAL_RANK`` in its environment, so Lightning's DDP strategy joins the group instead of
    launching the other ranks itself. The ranks run at once, each through :func:`run` (a rank's
    number is a start-up variable: each rank has its own server). A rank that fails ends the
    others (they would wait for it until the timeout), as Lightning's launcher does. Returns the
    ranks' results in rank order.
    """
    base = dict(os.environ if env is None else env)
    port = str(_free_port())
    envs = [
        {
            **base,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(world_size),
            "NODE_RANK": "0",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        for rank in range(world_size)
    ]
    pids: list[int] = []
    failed = threading.Event()
    lock = threading.Lock()

    def end(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def started(pid: int) -> None:
        with lock:
            pids.append(pid)
            if failed.is_set():  # a rank already failed before this one started
                end(pid)

    def one(rank_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        result = run(argv, cwd, rank_env, timeout, started=started)
        if result.returncode != 0:
            with lock:
                failed.set()
                for pid in pids:
                    end(pid)
        return result

    with ThreadPoolExecutor(max_workers=world_size) as pool:
        return list(pool.map(one, envs))


@atexit.register
def _close_all() -> None:
    for server in _servers.values():
        server.close()


if __name__ == "__main__":
    sys.path[0] = str(REPO)  # run as a script: the repository, not tests/, comes first
    serve()

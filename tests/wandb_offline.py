"""Read back what real wandb wrote offline: the ``run-<id>.wandb`` transaction log of each run.

wandb (0.19+) writes offline runs as a log of protobuf records in LevelDB's log format: a 7-byte
file header, then 32 KiB blocks of chunks, each chunk a 7-byte header (CRC32, length, type:
full/first/middle/last) and its bytes. wandb ships the record schema (``wandb_internal_pb2``) but
no reader any more, so the tests read the log themselves; nothing here fakes wandb.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    chunks: list[bytes] = []
    pending = b""
    pos = _FILE_HEADER
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            chunks.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _set(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What one offline wandb run holds, rebuilt from its records."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def history_keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Parse ``<run_dir>/run-<id>.wandb`` (``run_dir`` is a ``wandb/offline-run-*`` folder)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run = OfflineRun(path=run_dir)
    for record in _records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.group, run.name = record.run.run_group, record.run.display_name
            run.job_type = record.run.job_type
            for item in record.run.config.update:
                _set(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            run.artifacts.append(
                {
                    "name": record.artifact.name,
                    "type": record.artifact.type,
                    "files": [entry.path for entry in record.artifact.manifest.contents],
                }
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(save_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``<save_dir>/wandb`` (or a sweep dir), oldest first."""
    return [read_offline_run(path) for path in sorted(save_dir.rglob("offline-run-*"))]

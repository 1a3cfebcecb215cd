"""The run directory: what a run was (config, versions, commit, data) and what it measured.

Layout of ``RunDir(path)``::

    config.yaml      the resolved config (every default filled in)
    meta.json        library versions, git commit, data fingerprints, command line, host
    metrics.jsonl    one JSON object per line: {"event": "train"|"val"|"test", "step": ..., ...}
    best.pt last.pt  checkpoints (see fewshot_nsl.checkpoint)
    results.json     final test accuracies (mean ± 95% CI, per-episode accuracies)

Files are written atomically (temp file in the same folder, fsync, ``os.replace``) except
``metrics.jsonl``, which is appended to and flushed line by line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["RunDir", "atomic_write", "git_commit", "library_versions"]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically: ``write(handle)`` into a temp file in the same folder, flush,
    fsync, then ``os.replace`` onto ``path``. A crash at any point leaves either the old file
    or the new one, never a torn one; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible on every platform, hence best effort."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def library_versions() -> dict[str, str]:
    """Versions of Python, the libraries a result depends on, and the platform."""
    import numpy
    import torch
    import yaml

    import fewshot_nsl

    versions = {
        "python": platform.python_version(),
        "fewshot_nsl": fewshot_nsl.__version__,
        "torch": str(torch.__version__),  # a TorchVersion object, which weights_only rejects
        "numpy": str(numpy.__version__),
        "pyyaml": str(yaml.__version__),
        "platform": platform.platform(),
    }
    if torch.version.cuda is not None:
        versions["cuda"] = str(torch.version.cuda)
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return versions


def git_commit(folder: str | Path | None = None) -> str | None:
    """``HEAD`` of the git checkout holding ``folder`` (default: this package), suffixed with
    ``+dirty`` when tracked files have uncommitted changes; None outside a checkout."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode == 0 and status.stdout.strip() != ""
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def _to_json(value: Any) -> Any:
    """Make numpy/torch scalars and paths JSON-serialisable."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return value


class RunDir:
    """A run's output folder (created if missing); see the module docstring for its files."""

    CONFIG = "config.yaml"
    META = "meta.json"
    METRICS = "metrics.jsonl"
    RESULTS = "results.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run directory."""
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Save the resolved config as ``config.yaml``."""
        from fewshot_nsl.config import dump_config

        text = dump_config(config).encode()
        return atomic_write(self.file(self.CONFIG), lambda handle: handle.write(text))

    def write_meta(self, **extra: Any) -> dict[str, Any]:
        """Save ``meta.json``: library versions, git commit, command line, host, ``extra``
        (e.g. ``data={"train": fingerprint, ...}``). Returns what was written."""
        meta = {
            "versions": library_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        self.write_json(self.META, meta)
        return meta

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` as indented JSON to ``name``, atomically."""
        text = json.dumps(_to_json(payload), indent=2).encode()
        return atomic_write(self.file(name), lambda handle: handle.write(text))

    def read_json(self, name: str) -> dict[str, Any]:
        """Read a JSON file of the run directory (``FileNotFoundError`` naming it if absent)."""
        path = self.file(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return json.loads(path.read_text())

    def log(self, event: str, step: int, **values: Any) -> dict[str, Any]:
        """Append one metrics record ``{"event", "step", "time", **values}`` to metrics.jsonl."""
        record = {"event": event, "step": int(step), "time": round(time.time(), 3)}
        record.update(_to_json(values))
        with self.file(self.METRICS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        return record

    def metrics(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl, in order (a torn last line, from a kill, is skipped)."""
        path = self.file(self.METRICS)
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records of steps ``> after_step``: on resume from a checkpoint at that step,
        the interrupted run's later records would otherwise appear twice."""
        kept = [record for record in self.metrics() if record.get("step", 0) <= after_step]
        text = "".join(json.dumps(record) + "\n" for record in kept).encode()
        atomic_write(self.file(self.METRICS), lambda handle: handle.write(text))

"""The run directory: what a run was (config, versions, commit, data) and what it measured.

Layout of ``RunDir(path)``::

    config.yaml      the resolved config (every default filled in)
    meta.json        library versions, git commit, data fingerprints, command line, host
    metrics.jsonl    one JSON object per line: {"event": "train"|"val"|"test", "step": ..., ...}
    best.pt last.pt  checkpoints (see fewshot_nsl.checkpoint)
    results.json     final test accuracies (mean ± 95% CI, per-episode accuracies)

    run.lock         the run's lock file (pid and host of the last holder; see RunLock)

Files are written atomically (:func:`episodes.fileio.atomic_write`: temp file in the same
folder, fsync, ``os.replace``) except ``metrics.jsonl``, which is appended to and flushed line
by line. Storage failures raise :class:`~episodes.fileio.StorageError` (one line naming the
file); the run-directory policy errors below are subclasses of it, so a command-line tool
catches one type and exits 2.

One writer per run directory: :class:`RunLock` (``RunDir.lock()``) holds an exclusive
``flock`` on ``run.lock`` for the whole run. The kernel releases it when the process ends in
any way (kill -9 included), so a lock file left behind is harmless; a second writer gets
:class:`RunDirBusy` naming the holder's pid.

JSON files and metrics records never hold a bare ``NaN``/``Infinity`` (invalid JSON): a
non-finite number is written as ``null`` and its dotted key listed under ``"nonfinite"``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from episodes.fileio import (
    StorageError,
    as_storage_error,
    atomic_write,
    cleanup_stale_temp,
    ensure_folder,
    is_temp_file,
)

__all__ = [
    "RUN_FILES",
    "RunDir",
    "RunDirBusy",
    "RunDirError",
    "RunExists",
    "RunLock",
    "StorageError",
    "atomic_write",
    "cleanup_stale_temp",
    "finite_json",
    "git_commit",
    "holds_run",
    "library_versions",
    "next_free_run_dir",
    "remove_run",
]

#: The files a run writes in its directory (``summary.json``: a multi-run root's table).
RUN_FILES = (
    "config.yaml",
    "meta.json",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "results.json",
    "summary.json",
)
#: Any of these marks a directory as holding a run (``meta.json`` alone does not: it is
#: written with config.yaml).
_RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "results.json", "metrics.jsonl")
LOCK_FILE = "run.lock"


class RunDirError(StorageError):
    """A run directory cannot be used as asked (in use, holds another run, not a run)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock; ``pid`` is its pid (or None)."""

    def __init__(self, message: str, *, path: Path, pid: int | None) -> None:
        super().__init__(message, path=path)
        self.pid = pid


class RunExists(RunDirError):
    """A fresh run was pointed at a directory that already holds a run."""


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


def finite_json(value: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """``(value with every NaN/±inf float replaced by None, the dotted keys replaced)``: what
    ``json.dumps(..., allow_nan=False)`` accepts. List items are keyed by index (``acc.3``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [prefix or "<value>"]
    if isinstance(value, Mapping):
        clean, replaced = {}, []
        for key, item in value.items():
            clean[key], inner = finite_json(
                item, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"
            )
            replaced.extend(inner)
        return clean, replaced
    if isinstance(value, list):
        items = [finite_json(item, f"{prefix}.{index}") for index, item in enumerate(value)]
        return [item for item, _ in items], [key for _, keys in items for key in keys]
    return value, []


def _dump_finite(payload: Mapping[str, Any], **options: Any) -> str:
    """JSON of ``payload`` (after :func:`_to_json`) with non-finite numbers as null, listed
    under ``"nonfinite"`` (absent when all are finite)."""
    clean, replaced = finite_json(_to_json(payload))
    if replaced:
        clean["nonfinite"] = replaced
    return json.dumps(clean, allow_nan=False, **options)


# -- run-directory policy --------------------------------------------------------------------


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding (part of) a run: a config.yaml, checkpoint,
    results.json or metrics.jsonl in it."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _RUN_MARKERS)


def remove_run(path: str | Path) -> list[Path]:
    """Remove the run in ``path`` whole, for ``--overwrite``: its :data:`RUN_FILES`, temp files
    of killed writers, and the runs in its sub-directories (a multi-run root), removing the
    folders they leave empty. Never deletes anything else: files a run does not write are
    kept and returned (so the caller can name them). ``run.lock`` is kept, because the caller
    holds it (deleting a held lock file would let a third process lock a new one).

    Raises :class:`RunDirError` when ``path`` does not look like a run directory (refusing
    to empty an arbitrary folder given by mistake).
    """
    path = Path(path)
    if not holds_run(path):
        raise RunDirError(
            f"refusing to overwrite {path}: it does not look like a run directory "
            f"(none of {', '.join(_RUN_MARKERS)})",
            path=path,
        )
    return _remove_run_files(path)


def _remove_run_files(path: Path) -> list[Path]:
    kept: list[Path] = []
    for entry in sorted(path.iterdir()):
        try:
            if entry.is_dir() and not entry.is_symlink():
                if holds_run(entry):
                    kept.extend(_remove_run_files(entry))
                    lock = entry / LOCK_FILE
                    if list(entry.iterdir()) == [lock] and not RunLock.is_held(entry):
                        lock.unlink()
                    if not any(entry.iterdir()):
                        entry.rmdir()
                else:
                    kept.append(entry)
            elif entry.name in RUN_FILES or is_temp_file(entry):
                entry.unlink()
            elif entry.name != LOCK_FILE:
                kept.append(entry)
        except OSError as error:
            converted = as_storage_error(error, entry)
            if converted is None:
                raise
            raise converted from error
    return kept


def next_free_run_dir(path: str | Path) -> Path:
    """``path`` when it holds no run, else the first of ``path-2``, ``path-3``, ... that holds
    none (for a fresh run that must not touch an existing one). Two processes may pick the
    same name: the run lock decides, so call this again when ``RunLock`` says busy."""
    path = Path(path)
    candidate, number = path, 1
    while holds_run(candidate):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _busy(path: Path, descriptor: int) -> RunDirBusy:
    """The :class:`RunDirBusy` of run directory ``path`` whose lock file, open as
    ``descriptor``, names the holder (``PID HOST``)."""
    holder = os.pread(descriptor, 256, 0).decode(errors="replace").split()
    pid = int(holder[0]) if holder and holder[0].isdigit() else None
    where = f" on {holder[1]}" if len(holder) > 1 else ""
    return RunDirBusy(
        f"run directory {path} is in use by another run (pid "
        f"{pid if pid is not None else 'unknown'}{where}); wait for it to finish or "
        "choose another output directory",
        path=path,
        pid=pid,
    )


class RunLock:
    """The exclusive lock of one run directory: ``flock`` on ``DIR/run.lock``, holding
    ``"PID HOST"`` of the holder. Use as a context manager (or ``acquire``/``release``)::

        with RunDir(path).lock():
            ...  # the whole run: only this process writes in path

    The kernel drops the lock when the process ends (exit, exception, kill -9), so a stale
    lock file never blocks a later run. Locks are per open file: a second ``RunLock`` on the
    same directory in the same process is refused too. A child made by ``fork`` (e.g. a data
    loader worker) shares the lock until it exits; ``exec``'d programs do not inherit it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_FILE
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._descriptor is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory); :class:`RunDirBusy` when another process
        (or another ``RunLock`` object) holds it."""
        if self._descriptor is not None:
            return self
        ensure_folder(self.path)
        try:
            descriptor = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            converted = as_storage_error(error, self.file)
            if converted is None:
                raise
            raise converted from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = _busy(self.path, descriptor)
            os.close(descriptor)
            raise busy from None
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {platform.node()}\n".encode(), 0)
        except OSError as error:
            os.close(descriptor)
            converted = as_storage_error(error, self.file)
            if converted is None:
                raise
            raise converted from error
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Give the lock up (the lock file stays: see the class doc)."""
        if self._descriptor is not None:
            descriptor, self._descriptor = self._descriptor, None
            os.close(descriptor)  # closing the only descriptor releases the flock

    @staticmethod
    def check_free(path: str | Path) -> None:
        """Raise :class:`RunDirBusy` (naming the holder's pid) when some process holds the lock
        of run directory ``path`` now; creates nothing (a check before a run starts)."""
        try:
            descriptor = os.open(Path(path) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(Path(path), descriptor) from None
        finally:
            os.close(descriptor)

    @staticmethod
    def is_held(path: str | Path) -> bool:
        """Whether some process holds the lock of run directory ``path`` now."""
        lock_file = Path(path) / LOCK_FILE
        try:
            descriptor = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class RunDir:
    """A run's output folder (created if missing); see the module docstring for its files."""

    CONFIG = "config.yaml"
    META = "meta.json"
    METRICS = "metrics.jsonl"
    RESULTS = "results.json"

    def __init__(self, path: str | Path) -> None:
        self.path = ensure_folder(path)

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run directory."""
        return self.path / name

    def lock(self) -> RunLock:
        """The run's exclusive lock (a context manager; see :class:`RunLock`)."""
        return RunLock(self.path)

    def holds_run(self) -> bool:
        """Whether the directory already holds a run (see :func:`holds_run`)."""
        return holds_run(self.path)

    def cleanup_stale_temp(self) -> list[Path]:
        """Remove temp files left by killed writers (call with the lock held)."""
        return cleanup_stale_temp(self.path)

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
        """Write ``payload`` as indented JSON to ``name``, atomically (non-finite numbers as
        null, listed under ``"nonfinite"``)."""
        text = _dump_finite(payload, indent=2).encode()
        return atomic_write(self.file(name), lambda handle: handle.write(text))

    def read_json(self, name: str) -> dict[str, Any]:
        """Read a JSON file of the run directory (``FileNotFoundError`` naming it if absent)."""
        path = self.file(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return json.loads(path.read_text())

    def log(self, event: str, step: int, **values: Any) -> dict[str, Any]:
        """Append one metrics record ``{"event", "step", "time", **values}`` to metrics.jsonl
        and return it as written: a NaN/inf value becomes null and its key is listed under
        ``"nonfinite"``, so every line stays valid JSON."""
        record = {"event": event, "step": int(step), "time": round(time.time(), 3)}
        record.update(values)
        line = _dump_finite(record)
        path = self.file(self.METRICS)
        try:
            with path.open("a") as handle:
                handle.write(line + "\n")
                handle.flush()
        except OSError as error:
            converted = as_storage_error(error, path)
            if converted is None:
                raise
            raise converted from error
        return json.loads(line)

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
        """Drop records of steps ``> after_step`` and ``"test"`` records of steps
        ``>= after_step``: on resume from a checkpoint at that step, the run redoes what came
        after it (and tests at the end), whose records would otherwise appear twice. Torn
        lines (from a kill) are dropped too."""
        kept = [
            record
            for record in self.metrics()
            if record.get("step", 0) < after_step
            or (record.get("step", 0) == after_step and record.get("event") != "test")
        ]
        text = "".join(_dump_finite(record) + "\n" for record in kept).encode()
        atomic_write(self.file(self.METRICS), lambda handle: handle.write(text))

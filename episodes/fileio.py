"""Files that are either whole or absent, storage errors in one line, content hashes.

The one writer of every file the toolkit produces (caches, manifests, checkpoints, run
files)::

    atomic_write(path, lambda handle: handle.write(data))   # temp file, fsync, os.replace
    with atomic_folder(path) as temp: ...                   # a whole folder (a cache), renamed
    cleanup_stale_temp(folder)                              # temp files/folders of killed writers
    check_writable(folder)                                  # fail before long work, not after
    sampled_content_hash(images), full_content_hash(images) # what a cache really holds

A temp file is named ``.NAME.PID.RANDOM.fsnl.tmp`` next to its target and is held under an
exclusive ``flock`` while it is written, so :func:`cleanup_stale_temp` can tell a file whose
writer died (kill -9, power cut) from one being written right now, whatever the pid reuse.
A temp folder of :func:`atomic_folder` has the same name pattern and holds a lock file
(``FOLDER_LOCK``) that its writer keeps under ``flock`` until the folder is renamed.
Files are created with mode 0666 and folders 0777 minus the user's umask (``mkstemp`` and
``mkdtemp`` would make them 0600 / 0700, unreadable to colleagues on a shared cluster).

Storage failures (disk full, read-only or forbidden folder, quota) are raised as
:class:`StorageError`, an ``OSError`` whose message is one line naming the file or folder,
so a command-line tool can print it and exit 2 instead of showing a traceback.
POSIX only (``fcntl``), like the clusters the toolkit runs on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "ContentMismatch",
    "StorageError",
    "TEMP_SUFFIX",
    "as_storage_error",
    "FOLDER_LOCK",
    "atomic_folder",
    "atomic_write",
    "check_writable",
    "cleanup_stale_temp",
    "content_hashes",
    "ensure_folder",
    "full_content_hash",
    "is_temp_file",
    "sampled_content_hash",
    "verify_content",
]

#: Suffix of every temp file written by :func:`atomic_write`.
TEMP_SUFFIX = ".fsnl.tmp"
#: The lock file inside a temp folder of :func:`atomic_folder`, held by its writer (``flock``).
FOLDER_LOCK = ".writer.fsnl.lock"
_TEMP_PATTERN = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


class StorageError(OSError):
    """A file or folder could not be written for a reason the user must fix (disk full,
    read-only or forbidden folder). ``str()`` is one line naming the path; ``errno`` and
    ``filename`` are set as for any ``OSError``."""

    def __init__(self, message: str, *, code: int | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.errno = code
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.args[0])


#: errno -> (what it means, whether the message names the folder rather than the file).
_STORAGE_ERRNOS: dict[int, tuple[str, bool]] = {
    errno.ENOSPC: ("no space left on device", False),
    errno.EDQUOT: ("disk quota exceeded", False),
    errno.EFBIG: ("file too large for the file system", False),
    errno.EIO: ("input/output error (failing disk or lost network mount)", False),
    errno.EROFS: ("read-only file system", True),
    errno.EACCES: ("permission denied", True),
    errno.EPERM: ("operation not permitted", True),
}


def as_storage_error(error: OSError, path: str | Path) -> StorageError | None:
    """The one-line :class:`StorageError` for ``error`` raised while writing ``path``, or None
    when ``error`` is not a storage condition (then the caller re-raises it unchanged)."""
    if isinstance(error, StorageError):
        return error
    known = _STORAGE_ERRNOS.get(error.errno) if error.errno is not None else None
    if known is None:
        return None
    meaning, names_folder = known
    path = Path(path)
    if names_folder:
        folder = path if path.is_dir() else path.parent
        return StorageError(f"cannot write in {folder}: {meaning}", code=error.errno, path=folder)
    return StorageError(f"cannot write {path}: {meaning}", code=error.errno, path=path)


def ensure_folder(folder: str | Path) -> Path:
    """``mkdir -p folder``, with a :class:`StorageError` naming the folder on failure."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        converted = as_storage_error(error, folder)
        if converted is None:
            raise
        raise StorageError(
            f"cannot create folder {folder}: {_STORAGE_ERRNOS[error.errno][0]}",
            code=error.errno,
            path=folder,
        ) from error
    return folder


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is named like a temp file of :func:`atomic_write`."""
    return bool(_TEMP_PATTERN.match(Path(path).name))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically: ``write(handle)`` into a temp file in the same folder, flush,
    fsync, ``os.replace`` onto ``path``, fsync the folder. A crash at any point leaves either
    the old file or the new one, never a torn one; the temp file is removed on failure.

    The file gets mode 0666 minus the umask. Raises :class:`StorageError` (one line naming the
    file or folder) when the disk is full or the folder is read-only or forbidden.
    Returns ``path``.
    """
    path = Path(path)
    ensure_folder(path.parent)
    temp = _temp_path(path)
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as error:
        converted = as_storage_error(error, path)
        if converted is None:
            raise
        raise converted from error
    try:
        # Held until the handle closes, after the rename: marks the temp file as being written.
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temp, path)
    except BaseException as error:
        with suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            converted = as_storage_error(error, path)
            if converted is not None and converted is not error:
                raise converted from error
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible on every file system: best effort."""
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


def _raise_storage(error: OSError, path: Path) -> None:
    """Raise ``error`` as the one-line :class:`StorageError` about ``path`` when it is a storage
    condition; return (the caller re-raises ``error`` itself) otherwise."""
    converted = as_storage_error(error, path)
    if converted is not None:
        raise converted from error


def check_writable(folder: str | Path) -> Path:
    """Make sure files can be created in ``folder`` (created if missing) before long work whose
    result would then be lost: creates and removes one empty temp file. Raises
    :class:`StorageError` naming the folder (read-only, forbidden, full). Returns ``folder``."""
    folder = ensure_folder(folder)
    probe = _temp_path(folder / "probe")
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as error:
        _raise_storage(error, probe)
        raise
    os.close(descriptor)
    with suppress(OSError):
        probe.unlink()
    return folder


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build the folder ``path`` whole or not at all (a dataset cache)::

        with atomic_folder(out, overwrite=True) as temp:
            atomic_write(temp / "train.npy", ...)

    Yields a fresh temp folder ``.NAME.PID.RANDOM.fsnl.tmp`` next to ``path`` (mode 0777 minus
    the umask), whose writer holds the ``flock`` of its ``FOLDER_LOCK`` file. When the block
    ends without error the folder is renamed onto ``path`` (an existing ``path`` is moved
    aside first, then removed: only with ``overwrite``, else ``FileExistsError`` before
    anything is written); on any error it is removed. A killed writer's folder is removed
    by the next :func:`cleanup_stale_temp` of the parent, which this runs first.
    Storage failures in the block are :class:`StorageError` naming the file under ``path``
    (not the temp folder).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    parent = ensure_folder(path.parent)
    cleanup_stale_temp(parent)
    temp = _temp_path(path)
    try:
        os.mkdir(temp, 0o777)
    except OSError as error:
        _raise_storage(error, temp)
        raise
    lock = None
    try:
        lock = os.open(temp / FOLDER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield temp
        _fsync_directory(temp)
        if path.exists():  # overwrite: the old folder goes aside, as another (stale) temp
            aside = _temp_path(path)
            os.replace(path, aside)
            os.replace(temp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temp, path)
        _fsync_directory(parent)
        with suppress(OSError):
            (path / FOLDER_LOCK).unlink()
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            named = str(error.filename or path).replace(str(temp), str(path))
            where = Path(named)
            if isinstance(error, StorageError):
                raise StorageError(
                    str(error).replace(str(temp), str(path)), code=error.errno, path=where
                ) from error
            _raise_storage(error, where)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def cleanup_stale_temp(folder: str | Path, min_age_s: float = 1.0) -> list[Path]:
    """Remove the temp files and temp folders (:func:`atomic_folder`) that killed writers left
    in ``folder`` (not recursive).

    A temp file is stale when no process holds its ``flock`` (its writer is gone) and it is
    older than ``min_age_s`` (a writer takes the lock right after creating the file, so a
    younger file may be a writer between those two calls); a temp folder likewise, by the
    lock on its ``FOLDER_LOCK`` file (no such file: killed before taking it, or the old
    folder an overwrite moved aside). Files of other programs are never touched. Returns the
    removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for candidate in sorted(folder.iterdir()):
        if not is_temp_file(candidate):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            if _remove_stale_folder(candidate, now, min_age_s):
                removed.append(candidate)
            continue
        try:
            if now - candidate.stat().st_mtime < min_age_s:
                continue
            descriptor = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # renamed or removed meanwhile: not ours to clean
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(descriptor)
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
        finally:
            os.close(descriptor)  # releases the lock
    return removed


def _remove_stale_folder(candidate: Path, now: float, min_age_s: float) -> bool:
    """Remove the temp folder ``candidate`` when no writer holds its lock; True if removed."""
    try:
        if now - candidate.stat().st_mtime < min_age_s:
            return False
        descriptor: int | None = os.open(candidate / FOLDER_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        descriptor = None  # no lock file: its writer died before taking it, or an aside copy
    except OSError:
        return False
    try:
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                return False
        shutil.rmtree(candidate, ignore_errors=True)
        return not candidate.exists()
    finally:
        if descriptor is not None:
            os.close(descriptor)


# -- content hashes of arrays (caches) -----------------------------------------------------

#: Bytes hashed per block when hashing a whole array (bounded memory for a memmap).
_BLOCK_BYTES = 64 << 20


def _hasher_for(array: np.ndarray, kind: str) -> Any:
    """sha256 primed with what the bytes mean (kind, dtype, shape): a reshaped or re-typed
    array never shares a hash with the original."""
    hasher = hashlib.sha256()
    hasher.update(f"{kind};{array.dtype.str};{tuple(array.shape)};".encode())
    return hasher


def full_content_hash(array: np.ndarray) -> str:
    """sha256 (hex) of every byte of ``array`` (any shape; a ``np.memmap`` is read block by
    block) together with its dtype and shape. Reads the whole array: the slow, exact check."""
    array = np.asarray(array)
    hasher = _hasher_for(array, "full")
    if array.ndim == 0 or array.shape[0] == 0:
        hasher.update(np.ascontiguousarray(array).tobytes())
        return hasher.hexdigest()
    row_bytes = max(1, array[0].nbytes)
    rows_per_block = max(1, _BLOCK_BYTES // row_bytes)
    for start in range(0, array.shape[0], rows_per_block):
        hasher.update(np.ascontiguousarray(array[start : start + rows_per_block]).data)
    return hasher.hexdigest()


def sampled_rows(num_rows: int, rows: int) -> np.ndarray:
    """The row indices :func:`sampled_content_hash` reads: ``rows`` evenly spaced indices from
    the first to the last row (all rows when there are fewer), a pure function of the two."""
    if num_rows <= rows:
        return np.arange(num_rows, dtype=np.int64)
    return np.unique(np.linspace(0, num_rows - 1, num=rows).round().astype(np.int64))


def sampled_content_hash(array: np.ndarray, rows: int = 64) -> str:
    """sha256 (hex) of ``rows`` evenly spaced rows (first axis) of ``array``, with their
    indices, its dtype and shape: reads ``rows`` rows whatever the size, so it can run on
    every start. Detects a cache that was zeroed, truncated or replaced; a change confined to
    rows it does not read needs :func:`full_content_hash`."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    hasher = _hasher_for(array, f"sampled{rows}")
    if array.ndim == 0:
        hasher.update(np.ascontiguousarray(array).tobytes())
        return hasher.hexdigest()
    for index in sampled_rows(array.shape[0], rows):
        hasher.update(int(index).to_bytes(8, "little"))
        hasher.update(np.ascontiguousarray(array[index]).tobytes())
    return hasher.hexdigest()


class ContentMismatch(ValueError):
    """An array's content differs from the hash stored for it (a modified or damaged file)."""


def content_hashes(array: np.ndarray, full: bool = True) -> dict[str, str]:
    """``{"sampled": ..., "full": ...}`` of ``array`` (``full`` reads every byte; leave it out
    with ``full=False``): what a cache index stores to verify its arrays later."""
    hashes = {"sampled": sampled_content_hash(array)}
    if full:
        hashes["full"] = full_content_hash(array)
    return hashes


def verify_content(
    array: np.ndarray, stored: dict[str, str], source: str | Path, full: bool = False
) -> None:
    """Check ``array`` against hashes from :func:`content_hashes`: the sampled one always (when
    stored), the full one too when ``full``. Raises :class:`ContentMismatch`, one line naming
    ``source``, on a difference (or when ``full`` is asked and no full hash is stored)."""
    checks = [("sampled", sampled_content_hash)] + ([("full", full_content_hash)] if full else [])
    for name, digest in checks:
        if name not in stored:
            if name == "full":
                raise ContentMismatch(f"{source}: no full content hash stored to check against")
            continue
        if digest(array) != stored[name]:
            raise ContentMismatch(
                f"{source}: content differs from its stored {name} hash (modified or damaged "
                "file); prepare the data again"
            )

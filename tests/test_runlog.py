"""Run directories: atomic files, storage errors, the run lock, run-dir policy, valid JSON
metrics; content hashes of cache arrays (episodes.fileio). Process behaviour is tested with
real processes (kill -9 included)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import episodes.fileio as fileio
from episodes.fileio import (
    ContentMismatch,
    StorageError,
    atomic_folder,
    atomic_write,
    check_writable,
    cleanup_stale_temp,
    content_hashes,
    full_content_hash,
    is_temp_file,
    sampled_content_hash,
    sampled_rows,
    verify_content,
)
from fewshot_nsl.runlog import (
    RunDir,
    RunDirBusy,
    RunDirError,
    RunLock,
    holds_run,
    next_free_run_dir,
    remove_run,
)

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs: Any) -> subprocess.Popen[str]:
    """A real Python process running ``code`` against this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for_line(process: subprocess.Popen[str], expected: str) -> None:
    line = process.stdout.readline().strip()  # type: ignore[union-attr]
    assert line == expected, (line, process.stderr.read())  # type: ignore[union-attr]


def _strict_json(line: str) -> Any:
    """json.loads that rejects NaN/Infinity, as strict JSON readers do."""

    def reject(constant: str) -> Any:
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(line, parse_constant=reject)


# -- atomic_write ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_files_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda handle: handle.write(b"abc"))
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a.bin", lambda handle: handle.write(b"old"))

    def torn(handle: Any) -> None:
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_disk_full_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = atomic_write(tmp_path / "last.pt", lambda handle: handle.write(b"old"))

    def full(descriptor: int) -> None:  # ext4/NFS report a full disk at fsync time
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(StorageError) as caught:
        atomic_write(path, lambda handle: handle.write(b"new"))
    assert str(caught.value) == f"cannot write {path}: no space left on device"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_metrics_on_a_full_device_is_one_line(tmp_path: Path) -> None:
    """A real ENOSPC: metrics.jsonl is a link to /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    run = RunDir(tmp_path / "run")
    run.file(RunDir.METRICS).symlink_to("/dev/full")
    with pytest.raises(
        StorageError,
        match=r"^cannot write .*metrics.jsonl: no space left on "
        r"device$",
    ):
        run.log("train", 1, loss=0.5)


def test_read_only_folder_is_one_line_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fileio.os, "open", read_only)
    with pytest.raises(StorageError) as caught:
        atomic_write(tmp_path / "results.json", lambda handle: handle.write(b"{}"))
    assert str(caught.value) == f"cannot write in {tmp_path}: read-only file system"
    assert caught.value.errno == errno.EROFS


def test_unwritable_folder_for_real(tmp_path: Path) -> None:
    """A real permission error in another process; as root (which bypasses permissions) that
    process first drops to the unprivileged user 'nobody'."""
    base = Path(tempfile.mkdtemp(prefix="fsnl-ro-"))
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        os.chmod(locked, 0o555)
        process = _python(f"""
            import os
            from pathlib import Path
            from episodes.fileio import StorageError, atomic_write
            from fewshot_nsl.runlog import RunDir
            if os.geteuid() == 0:  # after the imports: nobody may not read the venv
                os.setgid(65534); os.setuid(65534)
            for attempt in (lambda: atomic_write(Path({str(locked)!r}) / "x.json",
                                                 lambda h: h.write(b"{{}}")),
                            lambda: RunDir(Path({str(locked)!r}) / "run")):
                try:
                    attempt()
                except StorageError as error:
                    print(error)
        """)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.splitlines() == [
            f"cannot write in {locked}: permission denied",
            f"cannot create folder {locked / 'run'}: permission denied",
        ]
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(base / "locked", 0o755)
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        base.rmdir()


# -- stale temp files ------------------------------------------------------------------------

_SLOW_WRITER = """
    import sys, time
    from episodes.fileio import atomic_write
    def write(handle):
        handle.write(b"partial")
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)
    atomic_write(sys.argv[1], write)
"""


def test_cleanup_removes_temp_files_of_killed_writers_only(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SLOW_WRITER), str(tmp_path / name)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("killed.pt", "alive.pt")
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "writing"  # type: ignore[union-attr]
        writers[0].send_signal(signal.SIGKILL)
        writers[0].wait(timeout=30)
        assert not (tmp_path / "killed.pt").exists()  # never a half-written target
        (tmp_path / "notes.tmp").write_text("a user's file")
        (tmp_path / ".x.tmp").write_text("another program's temp file")
        temps = sorted(p.name for p in tmp_path.iterdir() if is_temp_file(p))
        assert len(temps) == 2
        assert cleanup_stale_temp(tmp_path, min_age_s=1.0) == []  # too young to judge
        time.sleep(1.1)
        removed = cleanup_stale_temp(tmp_path, min_age_s=1.0)
        assert [p.name for p in removed] == [n for n in temps if n.startswith(".killed.pt.")]
        left = sorted(p.name for p in tmp_path.iterdir())
        assert ".x.tmp" in left and "notes.tmp" in left
        assert [n for n in left if is_temp_file(n)] == [n for n in temps if "alive" in n]
    finally:
        for writer in writers:
            writer.kill()
            writer.wait(timeout=30)


# -- run lock --------------------------------------------------------------------------------

_HOLDER = """
    import sys, time
    from fewshot_nsl.runlog import RunDir
    with RunDir(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_frees_the_lock(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(run)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
        assert RunLock.is_held(run)
        with pytest.raises(RunDirBusy) as caught:
            RunDir(run).lock().acquire()
        assert caught.value.pid == holder.pid
        assert f"in use by another run (pid {holder.pid} on " in str(caught.value)
        assert "\n" not in str(caught.value)
        # A second process is refused too (flock is per process, not only per object).
        contender = _python(f"""
            from fewshot_nsl.runlog import RunDirBusy, RunLock
            try:
                RunLock({str(run)!r}).acquire()
            except RunDirBusy as error:
                print(error.pid)
        """)
        out, err = contender.communicate(timeout=60)
        assert out.strip() == str(holder.pid), err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run / "run.lock").is_file()  # stale lock file left by the killed holder...
    assert not RunLock.is_held(run)
    with RunDir(run).lock() as lock:  # ...does not block the next run
        assert lock.held
        assert (run / "run.lock").read_text().split()[0] == str(os.getpid())
    assert not lock.held and not RunLock.is_held(run)


def test_lock_is_exclusive_within_a_process_and_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path) as lock:
            with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
                RunLock(tmp_path).acquire()
            raise RuntimeError("the run failed")
    assert not lock.held
    RunLock(tmp_path).acquire().release()


# -- run-directory policy --------------------------------------------------------------------


def _make_run(path: Path) -> RunDir:
    run = RunDir(path)
    run.write_json(RunDir.RESULTS, {"accuracy": 0.5})
    run.log("train", 1, loss=1.0)
    atomic_write(run.file("last.pt"), lambda handle: handle.write(b"ckpt"))
    return run


def test_holds_run_remove_run_and_next_free_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.npy").write_bytes(b"precious")
    assert not holds_run(empty) and not holds_run(tmp_path / "missing")
    with pytest.raises(RunDirError, match="refusing to overwrite .*does not look like a run"):
        remove_run(empty)
    assert (empty / "data.npy").read_bytes() == b"precious"

    root = tmp_path / "runs" / "quickstart"
    _make_run(root / "maml")
    _make_run(root / "protonet")
    atomic_write(root / "config.yaml", lambda handle: handle.write(b"name: q\n"))
    (root / "notes.txt").write_text("mine")
    (root / ".config.yaml.123.0123abcd.fsnl.tmp").write_bytes(b"torn")
    assert holds_run(root) and holds_run(root / "maml")
    assert next_free_run_dir(root) == root.with_name("quickstart-2")
    _make_run(root.with_name("quickstart-2"))
    assert next_free_run_dir(root) == root.with_name("quickstart-3")

    with RunDir(root).lock():
        kept = remove_run(root)
        assert kept == [root / "notes.txt"]
        assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "run.lock"]
    assert not holds_run(root)
    assert next_free_run_dir(root) == root


# -- metrics ---------------------------------------------------------------------------------


def test_non_finite_values_never_reach_json_as_bare_nan(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    record = run.log(
        "train",
        3,
        loss=float("nan"),
        accuracy=0.2,
        grad=[1.0, float("inf")],
        scalar=np.float32("-inf"),
    )
    assert record["loss"] is None and record["grad"] == [1.0, None]
    assert record["nonfinite"] == ["loss", "grad.1", "scalar"]
    lines = run.file(RunDir.METRICS).read_text().splitlines()
    assert _strict_json(lines[0])["nonfinite"] == ["loss", "grad.1", "scalar"]
    run.log("train", 4, loss=0.5)
    assert "nonfinite" not in _strict_json(run.file(RunDir.METRICS).read_text().splitlines()[1])
    run.write_json("results.json", {"accuracy": float("nan"), "per_shot": {"1": 0.4}})
    written = _strict_json(run.file("results.json").read_text())
    assert written == {"accuracy": None, "per_shot": {"1": 0.4}, "nonfinite": ["accuracy"]}


def test_truncate_metrics_drops_later_records_and_the_test_at_the_checkpoint(
    tmp_path: Path,
) -> None:
    run = RunDir(tmp_path)
    for step in range(1, 7):
        run.log("train", step, loss=1.0 / step)
        if step % 3 == 0:
            run.log("val", step, accuracy=0.3)
    run.log("test", 6, accuracy=0.4)
    with run.file(RunDir.METRICS).open("a") as handle:
        handle.write('{"event": "train", "st')  # torn by a kill
    run.truncate_metrics(6)  # resume from last.pt at step 6: the run will test again
    assert [(r["event"], r["step"]) for r in run.metrics()][-2:] == [("train", 6), ("val", 6)]
    run.truncate_metrics(3)
    assert [(r["event"], r["step"]) for r in run.metrics()] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("val", 3),
    ]
    for line in run.file(RunDir.METRICS).read_text().splitlines():
        _strict_json(line)


# -- content hashes --------------------------------------------------------------------------


def test_full_content_hash_reads_every_byte_block_by_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(37, 3, 5, 5), dtype=np.uint8)
    reference = hashlib.sha256(b"full;|u1;(37, 3, 5, 5);" + images.tobytes()).hexdigest()
    assert full_content_hash(images) == reference
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    monkeypatch.setattr(fileio, "_BLOCK_BYTES", 200)  # 2 rows per block: many blocks
    assert full_content_hash(mapped) == reference
    changed = images.copy()
    changed[36, 2, 4, 4] ^= 1  # one bit of the last row
    assert full_content_hash(changed) != reference
    assert full_content_hash(images.reshape(37, 75)) != reference  # shape is part of it


def test_sampled_content_hash_reads_evenly_spaced_rows() -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(1000, 4), dtype=np.uint8)
    rows = sampled_rows(1000, 64)
    assert rows[0] == 0 and rows[-1] == 999 and len(rows) == 64
    assert list(sampled_rows(5, 64)) == [0, 1, 2, 3, 4]
    digest = sampled_content_hash(images)
    assert sampled_content_hash(images.copy()) == digest
    assert sampled_content_hash(np.zeros_like(images)) != digest  # a zeroed cache
    assert sampled_content_hash(images[:999]) != digest  # a truncated one
    unread = next(i for i in range(1000) if i not in set(rows.tolist()))
    edited = images.copy()
    edited[unread] ^= 1
    assert sampled_content_hash(edited) == digest  # the documented limit: full hash needed
    assert full_content_hash(edited) != full_content_hash(images)
    edited[rows[10]] ^= 1
    assert sampled_content_hash(edited) != digest


def test_verify_content_against_stored_hashes(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, size=(300, 2, 3), dtype=np.uint8)
    stored = content_hashes(images)
    np.save(tmp_path / "images.npy", images)
    verify_content(np.load(tmp_path / "images.npy", mmap_mode="r"), stored, "cache", full=True)
    zeroed = np.zeros_like(images)
    with pytest.raises(
        ContentMismatch,
        match=r"^cache/images.npy: content differs from its "
        r"stored sampled hash",
    ):
        verify_content(zeroed, stored, "cache/images.npy")
    one_row = images.copy()
    one_row[next(i for i in range(300) if i not in set(sampled_rows(300, 64).tolist()))] ^= 1
    verify_content(one_row, stored, "cache")  # the fast check cannot see it...
    with pytest.raises(ContentMismatch, match="stored full hash"):
        verify_content(one_row, stored, "cache", full=True)  # ...the full one does
    with pytest.raises(ContentMismatch, match="no full content hash stored"):
        verify_content(images, content_hashes(images, full=False), "cache", full=True)


def test_atomic_folder_is_whole_or_absent_and_its_stale_temp_is_cleaned(tmp_path: Path) -> None:
    """A temp folder of a live writer is kept whatever its age; one nobody holds is removed."""
    out = tmp_path / "cache"
    with atomic_folder(out) as temp:
        atomic_write(temp / "a.npy", lambda handle: handle.write(b"a"))
        assert is_temp_file(temp) and not out.exists()
        assert cleanup_stale_temp(tmp_path, min_age_s=0.0) == []  # its writer holds the lock
    assert sorted(p.name for p in out.iterdir()) == ["a.npy"]  # the lock file is gone too
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(out):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out, overwrite=True) as temp:
            atomic_write(temp / "b.npy", lambda handle: handle.write(b"b"))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the old one, untouched
    with atomic_folder(out, overwrite=True) as temp:
        atomic_write(temp / "b.npy", lambda handle: handle.write(b"b"))
    assert sorted(p.name for p in out.iterdir()) == ["b.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    orphan = tmp_path / ".cache.99999.0123abcd.fsnl.tmp"  # killed before it took its lock
    (orphan / "part").mkdir(parents=True)
    (tmp_path / ".y.tmp").mkdir()  # another program's temp folder
    assert cleanup_stale_temp(tmp_path, min_age_s=0.0) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".y.tmp", "cache"]


def test_check_writable_names_the_folder(tmp_path: Path, monkeypatch) -> None:
    assert check_writable(tmp_path / "new") == tmp_path / "new"
    assert list((tmp_path / "new").iterdir()) == []  # the probe is removed

    def read_only(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(StorageError) as caught:
        check_writable(tmp_path)
    assert str(caught.value) == f"cannot write in {tmp_path}: read-only file system"

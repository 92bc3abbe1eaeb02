"""Caches and checkpoints that several processes may read and write at once.

Two `rlae-train` runs over the same members fill one score cache; an evaluation may load an agent
while training rewrites it. So every write goes to a temporary name of its own beside the target
(two writers never share one), is flushed to disk, and is renamed onto the target: a reader sees the
old content or the new, whole, never a mix, and a writer killed at any moment leaves the old content.

A directory cannot be renamed over a non-empty one, so swapping in a directory takes two renames (the
old one aside to `NAME.old`, the new one in). They run under the directory's lock, which readers hold
shared (`reading_directory`), and `NAME.old` is what a writer killed between the two renames leaves.
A read-modify-write (a cache that grows) holds the entry's lock around the whole sequence (`locked`).

Locks are `flock`s on a hidden `.NAME.lock` beside the entry. The lock files stay: deleting one while
another process waits on it would let a third lock a new file of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


def lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def previous_version(directory: Path) -> Path:
    """Where a directory swap puts the old version while it renames the new one in."""
    return directory.with_name(directory.name + ".old")


_held = threading.local()  # .locks: {lock file: shared} of the locks this thread holds


@contextlib.contextmanager
def locked(path: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Holds the inter-process lock of `path` (a file or a directory, existing or not) for the block.

    Exclusive by default. Shared lets other readers in and keeps writers out; it makes no lock file:
    where none exists, nothing has written there under a lock (a shipped agent, a read-only install).
    Re-entrant within a thread (a read-modify-write holds the lock its write takes again); other
    threads wait as other processes do.
    """
    lock = os.path.abspath(lock_file(Path(path)))
    held = _held.__dict__.setdefault("locks", {})
    if lock in held:
        if held[lock] and not shared:
            raise RuntimeError(f"{lock} is held shared by this thread: it cannot be taken exclusively inside that")
        yield
        return
    fd = _open_lock(lock, shared)
    if fd is None:
        yield
        return
    try:
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s: another process is writing %s", lock, path)
            fcntl.flock(fd, operation)
        held[lock] = shared
        yield
    finally:
        held.pop(lock, None)
        os.close(fd)  # releases the lock


def _open_lock(lock: str, shared: bool) -> int | None:
    if not shared:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        return os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def replacing_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file of its own beside `path`, for the block to write. When the block ends without
    an error, the file is flushed to disk and renamed onto `path`; on an error it is removed and
    `path` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    _remove_stale_temporaries(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@contextlib.contextmanager
def replacing_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory beside `directory`, for the block to fill. When the block ends
    without an error, its files are flushed to disk and it is swapped in for `directory` under the
    directory's lock; on an error it is removed and `directory` keeps what it had."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(directory)
    _remove_stale_temporaries(directory)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            _fsync(path)
        _fsync(tmp)
        old = previous_version(directory)
        with locked(directory):
            if not directory.exists() and old.exists():  # a writer killed between its renames: its predecessor back first
                os.replace(old, directory)
            shutil.rmtree(old, ignore_errors=True)
            if directory.exists():
                os.replace(directory, old)
            os.replace(tmp, directory)
            _fsync(directory.parent)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def reading_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """The directory to read, as one whole swap left it, held for the block (swaps wait for it):
    `directory` itself, or `NAME.old` where a writer was killed between its two renames."""
    directory = Path(directory)
    with locked(directory, shared=True):
        old = previous_version(directory)
        yield old if not directory.exists() and old.exists() else directory


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`: None when there is no such file, or when it does not parse (with a warning
    that its content will be computed again)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s is damaged (%s): computing it again", path, error)
        return None


def _temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer picks. Made here rather than by tempfile, which makes
    it private (0600): this way it gets the umask's permissions, as any file the process writes."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def _remove_stale_temporaries(path: Path, older_than_s: float = 6 * 3600) -> None:
    """Drops what writers killed mid-write left beside `path`; a temporary that old is no live write's."""
    now = time.time()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - stale.lstat().st_mtime <= older_than_s:
                continue
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


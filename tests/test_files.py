"""Writes that survive a kill and a second writer (`lm_eval_rlae.files`): a failed write leaves the old
content, concurrent writers never leave a file or a directory mixed from two writes, a reader of a
directory never sees half a swap, and the temporaries a killed writer left are cleaned up later."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lm_eval_rlae import files

ROOT = Path(__file__).resolve().parent.parent

# Writer `k` writes its own content (every byte k) many times: SIZE bytes into one file, or two files
# of a directory. A mixed result has two kinds of bytes, or too few.
SIZE = 1 << 20
_WRITER = """
import sys
from pathlib import Path
from lm_eval_rlae import files
kind, path, k, rounds, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for _ in range(rounds):
    if kind == "file":
        with files.replacing_file(path) as tmp:
            with open(tmp, "wb") as f:
                for _ in range(16):  # in pieces, so that writers interleave
                    f.write(bytes([k]) * (size // 16))
    else:
        with files.replacing_directory(path) as tmp:
            for name in ("a.bin", "b.bin"):
                (tmp / name).write_bytes(bytes([k]) * size)
"""


def _writers(kind: str, path: Path, rounds: int, size: int = SIZE) -> list[subprocess.Popen]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(path), str(k), str(rounds), str(size)], env=env) for k in (1, 2)]


def _whole(data: bytes, size: int) -> bool:
    return len(data) == size and data.count(data[:1]) == size


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "entry.json"
    files.write_text(path, "old")
    with pytest.raises(RuntimeError), files.replacing_file(path) as tmp:
        tmp.write_text("half of the n")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"

    directory = tmp_path / "checkpoint"
    with files.replacing_directory(directory) as tmp:
        (tmp / "state.json").write_text("old")
    with pytest.raises(RuntimeError), files.replacing_directory(directory) as tmp:
        (tmp / "state.json").write_text("new")
        raise RuntimeError("killed before the second file")
    assert [p.name for p in directory.iterdir()] == ["state.json"] and (directory / "state.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.lock", "checkpoint", "entry.json"]


def test_two_writers_of_one_file_never_leave_it_mixed(tmp_path):
    path = tmp_path / "entry.safetensors"
    writers = _writers("file", path, rounds=40)
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            data = path.read_bytes()
            assert _whole(data, SIZE), f"a read saw a mixed or partial file: {len(data)} bytes, starting {data[:1]!r}"
            reads += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert _whole(path.read_bytes(), SIZE) and reads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]  # no temporary left


def test_a_reader_of_a_directory_never_sees_two_writes_or_half_a_swap(tmp_path):
    directory = tmp_path / "best"
    size = 4096
    writers = _writers("directory", directory, rounds=150, size=size)
    reads = 0
    while any(w.poll() is None for w in writers):
        with files.reading_directory(directory) as current:
            if not current.exists():
                continue
            a, b = (current / "a.bin").read_bytes(), (current / "b.bin").read_bytes()
        assert _whole(a, size) and a == b, "a read saw files of two writes"
        reads += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.lock", "best"]


def test_a_swap_killed_between_its_renames_is_read_and_repaired(tmp_path):
    directory = tmp_path / "checkpoint"
    with files.replacing_directory(directory) as tmp:
        (tmp / "state.json").write_text("epoch 1")
    os.replace(directory, files.previous_version(directory))  # killed after the first rename
    with files.reading_directory(directory) as current:
        assert (current / "state.json").read_text() == "epoch 1"
    with files.replacing_directory(directory) as tmp:
        (tmp / "state.json").write_text("epoch 2")
    assert (directory / "state.json").read_text() == "epoch 2"
    assert not files.previous_version(directory).exists()


def test_a_lock_is_exclusive_across_threads_and_reentrant_within_one(tmp_path):
    entry, inside, overlaps = tmp_path / "entry", [], []

    def hold():
        with files.locked(entry):
            with files.locked(entry):  # the write inside a read-modify-write takes it again
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.05)
                inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]
    with files.locked(entry, shared=True), pytest.raises(RuntimeError, match="held shared"):
        with files.locked(entry):
            pass


def test_a_shared_lock_makes_no_lock_file(tmp_path):
    """Reading a shipped agent (a read-only install, a git checkout) leaves nothing behind."""
    with files.reading_directory(tmp_path / "agent") as current:
        assert current == tmp_path / "agent"
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_writers_are_removed_when_old(tmp_path):
    path = tmp_path / "entry.json"
    stale, fresh = tmp_path / ".entry.json.tmp-dead", tmp_path / ".entry.json.tmp-live"
    stale.write_text("x")
    fresh.write_text("y")
    day_ago = time.time() - 24 * 3600
    os.utime(stale, (day_ago, day_ago))
    files.write_text(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.json.tmp-live", "entry.json"]


def test_json_that_does_not_parse_reads_as_absent_with_a_warning(tmp_path, caplog):
    path = tmp_path / "run.json"
    assert files.read_json(path) is None
    path.write_text('{"key": [1, 2')
    assert files.read_json(path) is None
    assert f"{path} is damaged" in caplog.text and "computing it again" in caplog.text

"""An evaluation killed in the middle loses nothing: `lm_eval --model rlae ... --use_cache DIR`
started again recomputes only the requests whose results had not reached the harness's cache.

rlae hands each finished batch to the harness's cache hook (`cache_hook.add_partial`) as `--model
hf` hands each request; the harness writes it to its sqlite file at once. End to end: the CLI in a
subprocess, killed with SIGKILL, then run again.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

TASKS = ["tiny_gen", "tiny_mc"]

# The real CLI, with the engine slowed down (0.3 s per batch) so that the kill lands mid-run, and
# every batch the engine finishes counted in a log file.
_CLI = """
import json, sys, time
from lm_eval_rlae.engine import fusion
log = open(sys.argv.pop(1), "a")

def counted(name):
    original = getattr(fusion.FusionEngine, name)
    def run(self, batch, *args):
        time.sleep(0.3)
        out = original(self, batch, *args)
        log.write(json.dumps([name, len(batch)]) + "\\n")
        log.flush()
        return out
    setattr(fusion.FusionEngine, name, run)

counted("generate")
counted("loglikelihood")
from lm_eval.__main__ import cli_evaluate
sys.argv[0] = "lm_eval"
sys.exit(cli_evaluate())
"""


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-c", _CLI, str(log), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _cached(db: Path) -> int:
    """Rows in the harness's cache. Read-write, not read-only: a run killed inside a commit leaves a
    hot journal, which only a connection that may write rolls back (read-only, the file looks empty)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return conn.execute('SELECT COUNT(*) FROM "unnamed"').fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _computed(log: Path) -> int:
    return sum(n for _, n in map(json.loads, log.read_text().splitlines())) if log.exists() else 0


def _samples(output: Path, task: str) -> dict:
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return {s["doc"]["id"]: s["filtered_resps"] for s in map(json.loads, path.read_text().splitlines())}


def test_a_killed_evaluation_recomputes_only_what_it_had_not_finished(bpe_member, sp_member, tiny_tasks_dir, run_eval, tmp_path):
    cache = tmp_path / "cache" / "rlae"
    db = Path(f"{cache}_rank0.db")  # the harness's file name for --use_cache
    args = [
        "run", "--model", "rlae", "--model_args", f"members=[{bpe_member},{sp_member}]", "--tasks", ",".join(TASKS),
        "--include_path", tiny_tasks_dir, "--device", "cpu", "--batch_size", "1", "--use_cache", str(cache),
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]
    first_log, second_log = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first = _start(args, first_log)
    deadline = time.monotonic() + 240
    while _computed(first_log) < 14 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # 14 of the 36 requests: in the middle of a request type, whichever runs first
    assert first.poll() is None, "the first run ended before it could be killed:\n" + first.communicate()[1][-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = _cached(db)
    # everything it finished is saved, but the batch in flight (one context and its <= 4 choices):
    # the harness itself writes the cache only after each request type's last batch
    assert saved >= _computed(first_log) - 4, (saved, _computed(first_log))

    second = _start(args, second_log)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-4000:]
    total = _cached(db)
    assert total > saved + 4  # the kill left work to do
    assert _computed(second_log) == total - saved, "the second run recomputed requests the first one had saved"

    want = run_eval("rlae", {"members": [bpe_member, sp_member], "device": "cpu"}, TASKS, batch_size=1)
    for task in TASKS:
        got = _samples(tmp_path / "out", task)
        assert got.keys() == want[task].keys()
        for doc_id, responses in got.items():
            expected = want[task][doc_id]["filtered_resps"]
            if task == "tiny_gen":
                assert responses == expected, doc_id
            else:  # the samples file writes numbers as strings
                assert [float(ll) for ll, _ in responses] == pytest.approx([ll for ll, _ in expected], abs=1e-5), doc_id

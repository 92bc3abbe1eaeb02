"""Data-parallel evaluation: `accelerate launch --num_processes 2 -m lm_eval --model rlae ...` splits
the documents over two processes and gathers them, with the same result as one process, document by
document, and rank 0 writes every process's weight decisions beside the samples. End to end through
the CLI, on CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

TASKS = "tiny_gen,tiny_mc,tiny_roll"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(output: Path) -> dict[str, dict]:
    """{task/doc id: (filtered responses, metrics)} from the harness's logged samples."""
    out = {}
    for path in output.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            metrics = {key: sample[key] for key in sample["metrics"]}
            out[f"{path.name.split('_20')[0]}/{sample['doc']['id']}"] = (sample["filtered_resps"], metrics)
    return out


def _decisions(output: Path) -> dict[str, list]:
    """{task/doc id/request idx: weights of each decision} from the decisions files."""
    from lm_eval_rlae.decisions import read_decisions

    return {
        f"{task}/{line['doc_id']}/{line['idx']}": line.get("spans", [line.get("weights")])
        for task in TASKS.split(",")
        for line in read_decisions(output, task)
    }


def test_two_processes_give_the_one_process_results(tmp_path, bpe_member, sp_member, tiny_tasks_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # perplexity weights: a policy that reads the state, so each process records decisions
    args = ["-m", "lm_eval", "--model", "rlae", "--model_args", f"members=[{bpe_member},{sp_member}],weights=perplexity", "--tasks", TASKS,
            "--include_path", tiny_tasks_dir, "--batch_size", "4", "--log_samples"]
    one = subprocess.run([sys.executable, *args, "--output_path", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    # --multi_gpu is accelerate's torchrun launcher; without a GPU rlae makes the processes a CPU group
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, *args, "--output_path", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):  # the harness gave both processes a share of the documents
        assert f"Building contexts for tiny_mc on rank {rank}" in two.stderr
    single, parallel = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert len(single) > 20 and {key.split("/")[0] for key in single} == {"samples_tiny_gen", "samples_tiny_mc", "samples_tiny_roll"}
    assert parallel.keys() == single.keys()
    for key in single:
        # the same texts and choices; scores equal up to float32 noise (a document meets other documents in a batch)
        assert _close(parallel[key], single[key]), (key, parallel[key], single[key])
    single, parallel = _decisions(tmp_path / "one"), _decisions(tmp_path / "two")
    assert len(single) > 40 and parallel.keys() == single.keys()  # every request of both ranks, in rank 0's files
    for key in single:
        assert _close(parallel[key], single[key]), (key, parallel[key], single[key])


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple, dict)):
        if isinstance(a, dict):
            a, b = list(a.items()), list(b.items())
        return type(a) is type(b) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-6)  # a score (logged as a string)
    except (TypeError, ValueError):
        return a == b

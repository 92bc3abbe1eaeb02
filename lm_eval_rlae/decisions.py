"""Decisions a user can audit: the weights the policy chose for every request, written beside the
harness's logged samples.

With `--log_samples --output_path DIR`, an `rlae` model whose weights depend on the state (an agent,
`weights=perplexity`) writes `decisions_<task>_<date>.jsonl` in the directory of the harness's
`samples_<task>_<date>.jsonl`, with the same date, one line per request it ran:

    {"doc_id": 3, "idx": 0, "request_type": "generate_until", "repeat": 0, "members": ["a", "b"],
     "spans": [[0.71, 0.29], [0.64, 0.36]]}       generation: the weights of each span, in order
    {"doc_id": 3, "idx": 2, "request_type": "loglikelihood", "repeat": 0, "members": ["a", "b"],
     "weights": [0.55, 0.45]}                      scoring: its one decision, at the end of the context

`doc_id` is the samples' `doc_id`, `idx` the request's index within its document (`Instance.idx`:
a multiple-choice document's choice), `repeat` counts runs of one request (a task's `repeats`).
Uniform and fixed weights are the same for every request and already in the model arguments, so
they are not written: the file would repeat them. Requests the harness answers from its cache
(`--use_cache`) do not reach the model and have no line.

Where the hook is, and why. The harness decides where and when samples are written inside its
`EvaluationTracker`, which the model never sees: `lm_eval run` and scripts that pass a tracker to
`simple_evaluate` call `tracker.save_results_aggregated(...)` (which sets the date of the file names)
and then `tracker.save_results_samples(task_name, samples)` per task, on rank 0 only. So an `rlae`
model that records decisions wraps `EvaluationTracker.save_results_samples` once, when it is built:
after the samples of a task are written, that task's decisions go into the same directory under the
same date. Nothing changes for processes without such a model (a hook at interpreter start-up would
patch the harness in every Python process), and the user names the output once (a model argument
would make them name it twice). Only decisions taken since the tracker was made are written, so an
earlier evaluation in the same process never lands beside a later one's samples.

Data parallel (`accelerate launch`): each process records the documents it runs; the harness
gathers the logged samples to rank 0 through the model's `gather_object`, and each process's
decisions travel with them (`RLAELM.gather_object`), so rank 0 writes one file with every rank's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from pathlib import Path

import numpy as np
import torch


class DecisionLog:
    """The decisions of the latest run of each task's requests, until the task's samples are written.

    records: task -> {(request_type, doc_id, idx, repeat): line}; a line holds the weights as an
    array [S, M] (S spans; 1 when scoring) until it is written, and when it was taken.
    """

    def __init__(self):
        self.records: dict[str, dict[tuple, dict]] = {}

    def start(self, requests) -> None:
        """A request method begins: earlier runs of its tasks' requests of its type are forgotten (the
        harness calls each request method once per evaluation, with every task's requests)."""
        for task, kind in {(request.task_name, request.request_type) for request in requests}:
            if task in self.records:
                self.records[task] = {key: line for key, line in self.records[task].items() if key[0] != kind}

    def add(self, request, members: list[str], weights: np.ndarray) -> None:
        """One run of a harness request: its weights [S, M], one row per decision."""
        if request.task_name is None:  # not from a task (e.g. the benchmark's): no samples to sit beside
            return
        task = self.records.setdefault(request.task_name, {})
        repeat = 0
        while (request.request_type, request.doc_id, request.idx, repeat) in task:
            repeat += 1
        task[(request.request_type, request.doc_id, request.idx, repeat)] = {
            "doc_id": request.doc_id, "idx": request.idx, "request_type": request.request_type, "repeat": repeat,
            "members": members, "weights": weights, "time": time.perf_counter(),
        }

    def lines(self, task: str, since: float = float("-inf")) -> list[dict]:
        """The task's lines in the file's form, ordered by document, request and run."""
        out = []
        for key in sorted(self.records.get(task, {}), key=lambda key: (key[1], key[2], key[0], key[3])):
            record = self.records[task][key]
            if record["time"] < since:
                continue
            line = {k: v for k, v in record.items() if k not in ("weights", "time")}
            rows = np.round(record["weights"].astype(np.float64), 6).tolist()
            if record["request_type"] == "generate_until":
                line["spans"] = rows
            else:
                line["weights"] = rows[0]
            out.append(line)
        return out

    def write(self, task: str, path: Path, since: float = float("-inf")) -> bool:
        lines = self.lines(task, since)
        if lines:
            path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
        return bool(lines)

    def merge(self, records: dict[str, dict[tuple, dict]]) -> None:
        """Another process's records (taken now, as far as this process's clock goes)."""
        now = time.perf_counter()
        for task, lines in records.items():
            self.records.setdefault(task, {}).update({key: line | {"time": now} for key, line in lines.items()})


LOG = DecisionLog()  # one per process: it must outlive the model, which the harness drops before it saves samples


class Recorder:
    """An `rlae` model's link to the log: records the engine's policy decisions per harness request."""

    def __init__(self, engine, members: list[str], log: DecisionLog = LOG):
        self.engine, self.members, self.log = engine, members, log
        install_tracker_hook()

    def start(self, requests) -> None:
        self.log.start(requests)

    @contextlib.contextmanager
    def watch(self, requests):
        """Around one engine call whose batch rows are `requests`, in order: records every weight
        decision of the call for its row's request (a policy that ignores the state is not recorded)."""
        policy = self.engine.policy
        if not policy.reads_state or all(request.task_name is None for request in requests):
            yield
            return
        calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per decision: weights [B, M], live rows [B] or None
        self.engine.policy = _Watched(policy, calls)
        try:
            yield
        finally:
            self.engine.policy = policy
        if not calls:
            return
        weights = torch.stack([w for w, _ in calls]).float().cpu().numpy()  # [S, B, M]: one copy for the whole batch
        live = np.stack([np.ones(len(requests), bool) if rows is None else rows.cpu().numpy() for _, rows in calls])  # [S, B]
        for r, request in enumerate(requests):
            self.log.add(request, self.members, weights[live[:, r], r])  # the spans the row was still decoding


class _Watched:
    """The engine's policy, each decision kept (on its device: read once the batch is done)."""

    def __init__(self, policy, calls: list):
        self.policy, self.calls = policy, calls

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def __call__(self, state):
        weights = self.policy(state)  # [B, M]
        self.calls.append((weights.detach(), state.live))
        return weights


def install_tracker_hook() -> None:
    """Wrap `EvaluationTracker.save_results_samples` (once) to write the task's decisions after its samples."""
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    save = EvaluationTracker.save_results_samples
    if getattr(save, "writes_rlae_decisions", False):
        return

    @functools.wraps(save)
    def save_results_samples(tracker, task_name, samples):
        save(tracker, task_name, samples)
        write_beside_samples(tracker, task_name)

    save_results_samples.writes_rlae_decisions = True
    EvaluationTracker.save_results_samples = save_results_samples


def write_beside_samples(tracker, task: str, log: DecisionLog = LOG) -> Path | None:
    """`decisions_<task>_<date>.jsonl` where the tracker has just written `samples_<task>_<date>.jsonl`
    (its own rule for the directory), with the decisions taken since the tracker was made."""
    date = getattr(tracker, "date_id", None)
    if not tracker.output_path or date is None:
        return None
    directory = Path(tracker.output_path)
    directory = directory.parent if directory.suffix == ".json" else directory / str(tracker.general_config_tracker.model_name_sanitized)
    if not (directory / f"samples_{task}_{date}.jsonl").is_file():  # the harness could not write them
        return None
    path = directory / f"decisions_{task}_{date}.jsonl"
    return path if log.write(task, path, since=tracker.general_config_tracker.start_time) else None


def read_decisions(directory: Path, task: str) -> list[dict]:
    """Every decisions line of `task` in the files under `directory` (a harness output path)."""
    name = re.compile(rf"^decisions_{re.escape(task)}_\d{{4}}-\d\d-\d\dT.*\.jsonl$")
    return [
        json.loads(line)
        for path in sorted(Path(directory).rglob("decisions_*.jsonl"))
        if name.match(path.name)
        for line in path.read_text(encoding="utf-8").splitlines()
    ]

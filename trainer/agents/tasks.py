"""Harness tasks as RL data: each document of a split with the requests the harness itself builds for
it, and its reward, the task's own metric after the task's own filters and `process_results`.

Nothing here knows a task: prompts, few-shot examples (seeded as `lm_eval` seeds them; a train
document is never its own example), stop sequences, answer extraction and scoring all come from the
harness task given by name, so any task the harness runs can train an agent.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.models.utils import postprocess_generated_text

from lm_eval_rlae.engine.fusion import Decoding
from lm_eval_rlae.offline.data import TASK_CONFIGS

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("multiple_choice", "generate_until")
FEWSHOT_SEED = 1234  # lm_eval's default --fewshot_random_seed


@dataclass
class Document:
    task: TaskData
    index: int  # within the task's split
    doc: dict
    requests: list[Instance]  # the harness's own: one per choice, or the one generation request

    @property
    def key(self) -> str:
        """A stable id of the document (the offline tasks' own hash when there is one)."""
        return str(self.doc.get("doc_hash", f"{self.task.name}/{self.index}"))

    @property
    def contexts(self) -> list[str]:
        return [request.args[0] for request in self.requests]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice of a multiple-choice document."""
        return [tuple(request.args) for request in self.requests]

    def reward(self, responses: list) -> float:
        """The task's metric for these raw responses (per request: (loglikelihood, is_greedy) or a
        generated text with its stop sequence not yet cut), filtered and scored as the harness does."""
        return self.task.reward(self, responses)


class TaskData:
    """One harness task's documents of one split, its metric and, for generation, its decoding."""

    def __init__(self, task, name: str, split: str, metric: str | None = None, filter_name: str | None = None, limit: int | None = None):
        self.task, self.name, self.split = task, name, split
        if task.OUTPUT_TYPE not in OUTPUT_TYPES:
            raise ValueError(f"task {name!r} is {task.OUTPUT_TYPE}; an agent trains on {' and '.join(OUTPUT_TYPES)} tasks")
        self.kind = task.OUTPUT_TYPE
        metrics = [entry["metric"] for entry in task.config.metric_list or []] or list(task._metric_fn_list)
        self.metric = metric or metrics[0]
        if self.metric not in metrics:
            raise ValueError(f"task {name!r} has no metric {self.metric!r}: choose one of {', '.join(metrics)}")
        filters = {ensemble.name: ensemble for ensemble in task._filters}
        self.filter_name = filter_name or next(iter(filters))
        if self.filter_name not in filters:
            raise ValueError(f"task {name!r} has no filter {self.filter_name!r}: choose one of {', '.join(filters)}")
        self.filter = filters[self.filter_name]
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task.build_all_requests(limit=limit)
        by_doc: dict[int, list[Instance]] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        self.documents = [
            Document(self, doc_id, doc, sorted(by_doc[doc_id], key=lambda i: i.idx))
            for doc_id, doc in task.doc_iterator(limit=limit)
        ]

    def __len__(self) -> int:
        return len(self.documents)

    @cached_property
    def decoding(self) -> Decoding:
        """A generation task's decoding settings, normalised as `--model rlae` normalises them."""
        return Decoding.from_gen_kwargs(self.documents[0].requests[0].args[1], 256)

    def reward(self, document: Document, responses: list) -> float:
        if self.kind == "generate_until":  # as RLAELM.generate_until hands texts to the harness
            responses = [postprocess_generated_text(text, self.decoding.until, None) for text in responses]
        instances = []
        for request, response in zip(document.requests, responses, strict=True):
            instance = copy.copy(request)
            instance.resps, instance.filtered_resps = [response], {}
            instances.append(instance)
        self.filter.apply(instances)
        metrics = self.task.process_results(document.doc, [instance.filtered_resps[self.filter_name] for instance in instances])
        return float(metrics[self.metric])


def load_tasks(
    names: list[str], split: str, include_path: Path | None = TASK_CONFIGS, limit: int | None = None, metrics: dict | None = None
) -> dict[str, TaskData]:
    """The documents of `split` (train, validation or test) of each leaf task, through the harness's
    TaskManager. The harness builds requests for a task's test split; pointing `test_split` at the
    split wanted keeps everything else its own, the exclusion of a document from its own few-shot
    examples included (it applies whenever the few-shot split is the evaluated one)."""
    from lm_eval.tasks import TaskManager

    def leaf_tasks(include_defaults: bool) -> dict:
        manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
        return manager.load(list(names))["tasks"]

    try:  # the harness's own tasks take ~15 s to index: only when the names need them
        flat = leaf_tasks(include_path is None)
    except (KeyError, ValueError):
        flat = leaf_tasks(True)
    missing = [name for name in names if name not in flat]
    if missing:
        raise ValueError(f"tasks {missing} are groups or unknown to the harness: name leaf tasks")
    out = {}
    for name in names:
        task = flat[name]
        split_name = {"train": task.config.training_split, "validation": task.config.validation_split, "test": task.config.test_split}[split]
        if not split_name:
            raise ValueError(f"task {name!r} has no {split} split: an agent trains on train and selects on validation")
        task.config.test_split = split_name
        out[name] = TaskData(task, name, split, metric=(metrics or {}).get(name), limit=limit)
        logger.info("%s (%s split): %d documents, metric %s", name, split, len(out[name]), out[name].metric)
    return out

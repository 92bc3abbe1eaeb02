"""Harness tasks as RL data: each document of a split with the requests the harness itself builds for
it, and its reward, the task's own metric after the task's own filters and `process_results`.

Nothing here knows a task: prompts, few-shot examples (seeded as `lm_eval` seeds them; a train
document is never its own example), stop sequences, answer extraction and scoring all come from the
harness task given by name, so any task the harness runs can train an agent. `TaskMixture` turns a
training config's tasks (leaf tasks, globs, groups) and its split mapping into those leaf tasks, their
shares of the training episodes, and the split each reads for training, validation and test.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.models.utils import postprocess_generated_text

from lm_eval_rlae.calibration import (
    document_metric,
    documents_with_requests,
    fingerprint,
)
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


@dataclass(frozen=True)
class SplitRead:
    """Which documents of a task a role reads: those of `split` of its dataset (as the harness has them,
    after `process_docs`) at `indices`, or all of them. `name` says it as the config does (`validation`,
    `train[:90%]`); the score cache files scores under it."""

    name: str
    split: str
    indices: Sequence[int] | None = None


class TaskData:
    """One harness task's documents of one split, its metric and, for generation, its decoding.

    The harness builds requests for its evaluated split (`test_split`); pointing that at the split
    read keeps everything else its own, the exclusion of a document from its own few-shot examples
    included (it applies whenever the few-shot split is the evaluated one). A slice is read as its
    whole split narrowed to the slice's documents, through the harness's own `samples`, so the rule
    holds for slices too."""

    def __init__(self, task, name: str, read: SplitRead, metric: str | None = None, filter_name: str | None = None, limit: int | None = None):
        self.task, self.name, self.split = task, name, read.name
        task.config.test_split = read.split
        samples = None if read.indices is None else read.indices[:limit]  # the harness ignores limit with samples
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
        task.build_all_requests(limit=limit, samples=samples)
        self.documents = [Document(self, doc_id, doc, instances) for doc_id, doc, instances in documents_with_requests(task, limit, samples)]

    def __len__(self) -> int:
        return len(self.documents)

    @cached_property
    def decoding(self) -> Decoding:
        """A generation task's decoding settings, normalised as `--model rlae` normalises them."""
        return Decoding.from_gen_kwargs(self.documents[0].requests[0].args[1], 256)

    def reward(self, document: Document, responses: list) -> float:
        if self.kind == "generate_until":  # as RLAELM.generate_until hands texts to the harness
            responses = [postprocess_generated_text(text, self.decoding.until, None) for text in responses]
        return document_metric(self.task, self.filter, self.metric, document.doc, document.requests, responses)


def read_split(task, name: str, split: str) -> SplitRead:
    """What `split` reads of the task `name`: a split of its dataset, or one slice of one as `datasets`
    writes them (`train[:90%]`, `train[-500:]`)."""
    if split in task.dataset:
        return SplitRead(split, split)
    import datasets

    sizes = {key: len(_split_documents(task, key)) for key in task.dataset}
    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute(sizes)
    except (AssertionError, ValueError) as error:
        raise ValueError(f"task {name!r} has no split {split!r} (its dataset has {', '.join(sizes)}; a slice reads like train[:90%]): {error}") from None
    if len(parts) != 1:
        raise ValueError(f"task {name!r}: {split!r} reads several pieces; give one split or one slice of it")
    part = parts[0]
    if part.to <= part.from_:
        raise ValueError(f"task {name!r}: {split!r} holds no document ({part.splitname} has {sizes[part.splitname]})")
    return SplitRead(split, part.splitname, range(part.from_, part.to))


def _split_documents(task, split: str):
    """The documents of a whole split, as the harness reads them (its `test_docs`: after `process_docs`)."""
    docs = task.dataset[split]
    return task.config.process_docs(docs) if task.config.process_docs is not None else docs


def _indexed(task, read: SplitRead) -> list[tuple[int, dict]]:
    """(index in the split, document) of each document `read` names."""
    wanted = None if read.indices is None else set(read.indices)
    return [(i, doc) for i, doc in enumerate(_split_documents(task, read.split)) if wanted is None or i in wanted]


def _without(task, read: SplitRead, other: SplitRead) -> SplitRead:
    """`read` less its documents equal to one of `other` (exact duplicates: MMLU has a few)."""
    seen = {fingerprint(doc) for _, doc in _indexed(task, other)}
    docs = _indexed(task, read)
    kept = [i for i, doc in docs if fingerprint(doc) not in seen]
    return read if len(kept) == len(docs) else SplitRead(f"{read.name} minus {other.name}", read.split, kept)


ROLES = ("train", "validation", "test")  # what a split serves: training, selection, the final table
_CONFIG_SPLIT = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


class TaskMixture:
    """A training config's tasks as the harness's leaf tasks, each loaded once: its share of the
    training episodes, and which split of its dataset serves each role (train, validation, test).

    `entries` maps names to ratios. A name is a leaf task, a glob over the leaf tasks the TaskManager
    knows (`bb_arithmetic_*`), a tag, or a group (`mmlu`). Globs and tags give every leaf the whole
    ratio, as the harness reports each of them apart. A group's leaves share its ratio as the group's
    own score weighs them (lm-eval 0.4.13 `Group.aggregate`: over all its leaves at once, by their
    numbers of evaluated documents under `weight_by_size`, its first `aggregate_metric_list` entry,
    else equally); a group with no score of its own passes the whole ratio to each child. Shares are
    normalised to sum to 1.

    `splits` maps a pattern (a glob over leaf names, or an entry's name) to {role: split}, a split or
    a slice of the task's dataset (`read_split`); roles it leaves out keep the task config's own
    (`training_split`, `validation_split`, `test_split`). Refused, naming the task, the split and what
    exists: a split the dataset lacks, roles whose splits overlap (a document used for training is
    never used for selection), and a role that a leaf has no split for (at once for `roles`, the ones a
    run needs, so that it fails before any model loads). Exact duplicates of a training document in
    the validation split (MMLU has a few) are left out of it.
    """

    def __init__(self, entries: dict[str, float], splits: dict[str, dict[str, str]] | None = None, include_path: str | Path | None = TASK_CONFIGS, roles: tuple[str, ...] = ()):
        if not entries or not all(isinstance(ratio, (int, float)) and ratio > 0 for ratio in entries.values()):
            raise ValueError(f"tasks {entries}: give each task, glob or group a positive ratio")
        try:  # the harness's own tasks take ~15 s to index: only when the names need them
            self.tasks, by_entry = _expand(entries, include_path, include_defaults=include_path is None)
        except Exception:  # any failure here (unknown names, groups built on the harness's tasks) means: index those too
            try:
                self.tasks, by_entry = _expand(entries, include_path, include_defaults=True)
            except LookupError as error:  # an unknown name, a glob without a match
                raise ValueError(f"{error.args[0]}: fix the name in tasks") from None
        self.entry_of: dict[str, str] = {}  # leaf -> the entry of `entries` it came from
        for entry, shares in by_entry.items():
            for leaf in shares:
                if leaf in self.entry_of:
                    raise ValueError(f"task {leaf!r} comes from both {self.entry_of[leaf]!r} and {entry!r}: name it once")
                self.entry_of[leaf] = entry
        total = sum(share for shares in by_entry.values() for share in shares.values())
        self.shares = {leaf: share / total for shares in by_entry.values() for leaf, share in shares.items()}
        for leaf, task in self.tasks.items():
            if task.OUTPUT_TYPE not in OUTPUT_TYPES:
                raise ValueError(f"task {leaf!r} (from {self.entry_of[leaf]!r}) is {task.OUTPUT_TYPE}; an agent trains on {' and '.join(OUTPUT_TYPES)} tasks")
        self.splits, self.reads = self._map_splits(splits or {})  # leaf -> role -> as configured / SplitRead
        for role in roles:
            self._require(role)

    def load(self, role: str, limit: int | None = None, metrics: dict[str, str] | None = None) -> dict[str, TaskData]:
        """The documents of each leaf's split for `role` (its first `limit`), with the harness's requests;
        `metrics` maps patterns as `splits` does to the reward metric (default: the task's first)."""
        self._require(role)
        out = {}
        for leaf, task in self.tasks.items():
            metric = next((value for key, value in (metrics or {}).items() if self._matches(key, leaf)), None)
            read = self.reads[leaf][role]
            if role == "validation" and "train" in self.reads[leaf]:
                read = _without(task, read, self.reads[leaf]["train"])
            out[leaf] = TaskData(task, leaf, read, metric=metric, limit=limit)
            logger.info("%s (%s: %s): %d documents, metric %s", leaf, role, out[leaf].split, len(out[leaf]), out[leaf].metric)
        return out

    def record(self) -> dict[str, dict]:
        """What a run trained on, for its config.json and its agents: {leaf: share, entry, splits}."""
        return {leaf: {"share": self.shares[leaf], "entry": self.entry_of[leaf], "splits": self.splits[leaf]} for leaf in self.tasks}

    def _matches(self, pattern: str, leaf: str) -> bool:
        return fnmatch.fnmatchcase(leaf, pattern) or self.entry_of[leaf] == pattern

    def _map_splits(self, splits: dict[str, dict[str, str]]) -> tuple[dict[str, dict[str, str | None]], dict[str, dict[str, SplitRead]]]:
        for pattern, mapping in splits.items():
            if not isinstance(mapping, dict) or set(mapping) - set(ROLES):
                raise ValueError(f"splits[{pattern!r}] = {mapping!r}: give {{role: split}} with roles among {', '.join(ROLES)}")
            if not any(self._matches(pattern, leaf) for leaf in self.tasks):  # e.g. a config's tasks replaced by others
                logger.warning("splits[%r] matches none of the tasks %s or their leaves", pattern, ", ".join(dict.fromkeys(self.entry_of.values())))
        mappings, reads = {}, {}
        for leaf, task in self.tasks.items():
            patterns = [pattern for pattern in splits if self._matches(pattern, leaf)]
            if len(patterns) > 1:
                raise ValueError(f"task {leaf!r} is matched by splits {patterns}: give it one mapping")
            mapping = {role: getattr(task.config, _CONFIG_SPLIT[role]) for role in ROLES} | (splits[patterns[0]] if patterns else {})
            reads[leaf] = {role: read_split(task, leaf, split) for role, split in mapping.items() if split is not None}
            for (role, a), (other, b) in itertools.combinations(reads[leaf].items(), 2):
                whole = a.indices is None or b.indices is None
                if a.split == b.split and (whole or max(a.indices.start, b.indices.start) < min(a.indices.stop, b.indices.stop)):
                    raise ValueError(
                        f"task {leaf!r}: {role} ({a.name}) and {other} ({b.name}) share documents of its split {a.split!r}; "
                        f"a document used for training is never used for selection: map them to different splits or disjoint slices, e.g. {a.split}[:80%] and {a.split}[80%:]"
                    )
            if task.config.num_fewshot and "validation" in reads[leaf] and reads[leaf]["validation"].split == task.fewshot_cfg.split:
                logger.warning("%s: its few-shot examples come from %r, as its validation documents do: a training prompt may show one as an example", leaf, task.fewshot_cfg.split)
            mappings[leaf] = mapping
        return mappings, reads

    def _require(self, role: str) -> None:
        """Refuse, if some leaves have no split for `role`: which (a whole group at once), what their datasets have, and a mapping that fixes it."""
        leaves = [leaf for leaf, mapping in self.splits.items() if mapping[role] is None]
        if not leaves:
            return
        named = []
        for entry in dict.fromkeys(self.entry_of[leaf] for leaf in leaves):
            members = [leaf for leaf, e in self.entry_of.items() if e == entry]
            whole = entry not in members and set(members) <= set(leaves)
            named += [f"{entry!r} ({len(members)} tasks)"] if whole else [repr(leaf) for leaf in members if leaf in leaves]
        available = sorted({split for leaf in leaves for split in self.tasks[leaf].dataset})
        dataset, test = self.tasks[leaves[0]].dataset, self.tasks[leaves[0]].config.test_split
        source = max((split for split in dataset if split != test), key=lambda split: len(dataset[split]), default=test)  # the largest but test
        example = f"{{test: {source}}}" if role == "test" else f"{{train: '{source}[:80%]', validation: '{source}[80%:]'}}"
        raise ValueError(
            f"{', '.join(named)}: no split to {'train on' if role == 'train' else f'serve {role}'} (the task config names none, and "
            f"splits maps none; the datasets have {', '.join(available)}). Map one in the config, e.g. "
            f"splits: {{{self.entry_of[leaves[0]]}: {example}}}"
        )


def _expand(entries: dict[str, float], include_path, include_defaults: bool) -> tuple[dict, dict[str, dict[str, float]]]:
    """({leaf: harness Task}, {entry: {leaf: its share of the entry's ratio}}) through one TaskManager."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    tasks, by_entry = {}, {}
    for entry, ratio in entries.items():
        names = fnmatch.filter(manager.all_subtasks, entry) if any(c in entry for c in "*?[") else [entry]
        if not names:
            raise LookupError(f"{entry!r} matches no leaf task the harness knows" + (f" (nor in {include_path})" if include_path else ""))
        loaded = manager.load(names)
        group = loaded["groups"].get(entry)
        by_entry[entry] = _group_shares(group, ratio) if group is not None else {name: ratio for name in loaded["tasks"]}
        if not by_entry[entry]:
            raise LookupError(f"{entry!r} has no leaf task")
        tasks |= loaded["tasks"]
    return tasks, by_entry


def _group_shares(group, ratio: float) -> dict[str, float]:
    """{leaf: its share of `ratio`}, as the group's own score weighs its leaves (see TaskMixture)."""
    from lm_eval.api.group import Group

    if not group.has_aggregation:  # no score of its own: each child is weighed apart
        shares = {}
        for child in group:
            shares |= _group_shares(child, ratio) if isinstance(child, Group) else {child.task_name: ratio}
        return shares
    leaves = group.get_all_tasks()
    sizes = [len(leaf.eval_docs) if group.aggregate_metric_list[0].weight_by_size else 1 for leaf in leaves]
    return {leaf.task_name: ratio * size / sum(sizes) for leaf, size in zip(leaves, sizes)}

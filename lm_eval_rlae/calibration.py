"""`calibrate=K`: before a task runs, the ensemble tries its weights (or agent) and each member alone
on K labelled documents of that task that the evaluation does not read, and runs the task with a
member alone only where that member beats the configured policy there with evidence (`choose`).

Why: on a task it never saw, neither an agent nor any fixed weighting can tell which member is
competent from what the members show. A member's confidence says how peaked it is, not whether it is
right (the arithmetic specialist is as sure on language questions it gets wrong), and how well a
member reads the prompt does not say it either (README, "Tasks never trained on"). A task's own
labelled documents do: on the leave-one-task-out folds, 16 of them take an agent from 2.0 points under
the better member alone to 2.5 over it, and keep it on every task it was trained on.

The documents come from the task's validation split, else its training split, else its few-shot
split: never the split being evaluated, and never a document equal to one being evaluated. They are
built and scored by the harness's own code (`build_all_requests`, the task's filter and metric) on
the task the harness is evaluating, with the run's settings (few-shot count, chat template, system
instruction): `lm_eval.evaluator.evaluate` is wrapped (once, as `decisions.py` wraps the tracker) to
note the tasks it runs. Used outside the harness, a task is loaded by name from `calibrate_include`
(default: the project's offline tasks) or the harness's own. Tasks that do not load, tasks without another
labelled split, and log-likelihood-rolling (perplexity) tasks keep the configured policy, with a
warning.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval.models.utils import postprocess_generated_text

from lm_eval_rlae.engine.fusion import Decoding, FusionEngine
from lm_eval_rlae.policies.base import FixedPolicy, WeightPolicy

logger = logging.getLogger("lm_eval.rlae.calibration")  # under the harness's logger: its choice shows where the run's log does
POLICY = "policy"  # the configured weights or agent, among the candidates
SWITCH_P = 0.1  # the evidence a member alone needs to replace the configured policy (`choose`)
DEFAULT_DOCUMENTS = 16  # `calibrate=auto` with an agent (README, "Doing no harm on a task never seen")
EVALUATING: dict[str, tuple[object, dict]] = {}  # task name -> (the harness's task, its run's prompt options), per process


@dataclass
class Calibration:
    """What `calibrate` decided for one task."""

    task: str
    chosen: str  # POLICY, or "<member> alone"
    split: str | None = None  # where its documents came from
    documents: int = 0
    metric: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> mean metric on the documents
    reason: str | None = None  # why the policy was kept without a try


class Calibrator:
    """Chooses, per task, between the engine's policy and each member alone (one-hot weights)."""

    def __init__(
        self, engine: FusionEngine, documents: int, include_path: str | None = None, batch_size: int = 8, max_gen_toks: int = 256, fewshot_seed: int = 1234
    ):
        if documents < 1:
            raise ValueError(f"calibrate={documents}: give the number of labelled documents to try each candidate on (>= 1), or leave it out")
        self.engine, self.documents, self.batch_size, self.max_gen_toks, self.fewshot_seed = engine, documents, batch_size, max_gen_toks, fewshot_seed
        self.include_path = include_path
        self.policy = engine.policy
        n = len(engine.members)
        self.candidates: dict[str, WeightPolicy] = {POLICY: self.policy}
        for m, member in enumerate(engine.members):
            self.candidates[f"{member.name} alone"] = FixedPolicy([float(i == m) for i in range(n)])
        self.calibrations: dict[str, Calibration] = {}
        install_evaluate_hook()

    def policy_for(self, task_name: str | None, evaluated: list) -> WeightPolicy:
        """The policy for `task_name`'s requests (`evaluated`: the harness's instances of that task in
        this call, whose documents calibration never reads)."""
        if task_name is None:
            return self.policy
        if task_name not in self.calibrations:
            calibration = self._calibrate(task_name, evaluated)
            self.calibrations[task_name] = calibration
            if calibration.reason:
                logger.warning("calibrate: %s keeps the configured policy: %s", task_name, calibration.reason)
            else:
                scores = ", ".join(f"{name} {score:.3f}" for name, score in calibration.scores.items())
                logger.info(
                    "calibrate: %s, %d documents of %s, %s: %s -> %s",
                    task_name, calibration.documents, calibration.split, calibration.metric, scores, calibration.chosen,
                )
        return self.candidates[self.calibrations[task_name].chosen]

    def _calibrate(self, task_name: str, evaluated: list) -> Calibration:
        try:
            task, options = self._load(task_name)
        except Exception as error:  # noqa: BLE001 - whatever stops the task loading (a dataset offline), the run goes on as configured
            return Calibration(task_name, POLICY, reason=f"the task does not load here ({type(error).__name__}: {error})")
        if task is None:
            return Calibration(task_name, POLICY, reason=f"the harness knows no task {task_name!r} by that name (calibrate_include=DIR adds a task directory)")
        if task.OUTPUT_TYPE not in ("multiple_choice", "generate_until"):
            return Calibration(task_name, POLICY, reason=f"its requests are {task.OUTPUT_TYPE}: calibration compares accuracy-like metrics")
        seen = {fingerprint(instance.doc) for instance in evaluated if instance.doc is not None}
        picked = self._labelled_documents(task, seen)
        if picked is None:
            return Calibration(task_name, POLICY, reason="it has no labelled split besides the one evaluated (validation, training or few-shot)")
        split, indices = picked
        metric = next(iter(task.config.metric_list or []), {}).get("metric") or next(iter(task._metric_fn_list))
        higher = task.higher_is_better().get(metric, True)
        filter_ = task._filters[0]
        task.set_fewshot_seed(seed=self.fewshot_seed)
        task.build_all_requests(samples=indices, **options)
        docs = [(doc, instances) for _, doc, instances in documents_with_requests(task, samples=indices)]
        per_document = {}
        try:
            for name, candidate in self.candidates.items():
                self.engine.use(candidate)
                responses = self._responses(task.OUTPUT_TYPE, [instance for _, instances in docs for instance in instances])
                per_document[name], start = [], 0
                for doc, instances in docs:
                    per_document[name].append(document_metric(task, filter_, metric, doc, instances, responses[start : start + len(instances)]))
                    start += len(instances)
        finally:
            self.engine.use(self.policy)
        scores = {name: sum(values) / len(values) for name, values in per_document.items()}
        return Calibration(task_name, choose(per_document, POLICY, higher), split, len(docs), metric, scores)

    def _responses(self, output_type: str, instances: list) -> list:
        """The engine's raw responses to the instances, in order, in batches of the model's size."""
        if output_type == "multiple_choice":  # a question's choices come together: ~4 requests a document
            size = 4 * self.batch_size
            return [answer for start in range(0, len(instances), size) for answer in self.engine.loglikelihood([i.args for i in instances[start : start + size]])]
        decoding = Decoding.from_gen_kwargs(instances[0].args[1], self.max_gen_toks)  # one task: one decoding
        texts = []
        for start in range(0, len(instances), self.batch_size):
            texts += self.engine.generate([instance.args[0] for instance in instances[start : start + self.batch_size]], decoding)
        return [postprocess_generated_text(text, decoding.until, None) for text in texts]

    def _labelled_documents(self, task, seen: set[str]) -> tuple[str, list[int]] | None:
        """(split, indices of up to `documents` of its documents, drawn by `sample`) from the first labelled
        split that is not the evaluated one and holds documents the evaluation does not read."""
        config = task.config
        evaluated = config.test_split if task.has_test_docs() else config.validation_split
        for split in dict.fromkeys(s for s in (config.validation_split, config.training_split, config.fewshot_split) if s and s != evaluated):
            if split not in task.dataset:
                continue
            config.test_split = split  # the harness builds requests for its test split: point it here
            unseen = [i for i, doc in enumerate(task.eval_docs) if fingerprint(doc) not in seen]
            if unseen:
                return split, [unseen[i] for i in sample(len(unseen), self.documents, self.fewshot_seed)]
        return None

    def _load(self, task_name: str) -> tuple[object | None, dict]:
        """(a copy of the task, the `build_all_requests` options of its run): the harness's own task when
        it is evaluating it; else loaded by name from `include_path` (default: the project's offline
        tasks), then with the harness's own tasks (indexing those takes ~15 s, once)."""
        if task_name in EVALUATING:
            task, options = EVALUATING[task_name]
            task = copy.copy(task)
            task._config = copy.copy(task.config)  # its splits are pointed at the calibration documents
            return task, options
        from lm_eval.tasks import TaskManager

        from lm_eval_rlae.offline.data import TASK_CONFIGS

        path = str(Path(self.include_path or TASK_CONFIGS))
        for defaults in (False, True):
            if (path, defaults) not in _MANAGERS:
                _MANAGERS[path, defaults] = TaskManager(include_path=path, include_defaults=defaults)
            if task_name in _MANAGERS[path, defaults].all_tasks:
                return _MANAGERS[path, defaults].load(task_name)["tasks"][task_name], {}
        return None, {}


_MANAGERS: dict[tuple[str, bool], object] = {}  # (include path, with the harness's tasks) -> TaskManager, per process


def install_evaluate_hook() -> None:
    """Wrap `lm_eval.evaluator.evaluate` (once) to note, before it runs, each task it evaluates and the
    prompt options of the run, so that calibration builds its documents as the run builds its own."""
    from lm_eval import evaluator

    evaluate = evaluator.evaluate
    if getattr(evaluate, "notes_rlae_tasks", False):
        return

    @functools.wraps(evaluate)
    def evaluate_noting_tasks(*args, **kwargs):
        import inspect

        bound = inspect.signature(evaluate).bind(*args, **kwargs)
        bound.apply_defaults()
        run = bound.arguments
        chat = bool(run["apply_chat_template"])
        options = {
            "system_instruction": run["system_instruction"],
            "apply_chat_template": chat,
            "fewshot_as_multiturn": run["fewshot_as_multiturn"],
            "chat_template": getattr(run["lm"], "apply_chat_template", None) if chat else None,
            "tokenizer_name": getattr(run["lm"], "tokenizer_name", "") if chat else "",
        }
        for task in _leaf_tasks(run["task_dict"]):
            EVALUATING[task.config.task] = (task, options)
        return evaluate(*args, **kwargs)

    evaluate_noting_tasks.notes_rlae_tasks = True
    evaluator.evaluate = evaluate_noting_tasks


def _leaf_tasks(task_dict):
    """The tasks of a harness task dict, either form (`{"tasks": {...}, "groups": ...}` or nested by group)."""
    from lm_eval.api.task import Task

    for value in task_dict.values():
        if isinstance(value, Task):
            yield value
        elif isinstance(value, dict):
            yield from _leaf_tasks(value)


def sample(available: int, documents: int, seed: int = 1234) -> list[int]:
    """Which `documents` of `available` to calibrate on, in order: a seeded draw, as splits are often
    sorted (by kind, by source) and their first documents need not stand for the task."""
    return sorted(random.Random(seed).sample(range(available), min(documents, available)))


def choose(per_document: dict[str, list[float]], keep: str, higher_is_better: bool = True, alpha: float = SWITCH_P) -> str:
    """`keep` (the configured policy), unless another candidate beats it on the documents with evidence:
    a one-sided sign test over the documents where the two differ, p < `alpha`. Of those that do, the
    one with the best mean. On 16 documents, a member right on 5 more documents than the policy and
    never worse is taken (p = 0.03); one right on 2 more is not."""
    sign = 1 if higher_is_better else -1
    mean = {name: sign * sum(values) / len(values) for name, values in per_document.items()}
    best = keep
    for name, values in per_document.items():
        wins = sum(sign * (a - b) > 0 for a, b in zip(values, per_document[keep], strict=True))
        losses = sum(sign * (a - b) < 0 for a, b in zip(values, per_document[keep], strict=True))
        if name != keep and _sign_test(wins, losses) < alpha and mean[name] > mean[best]:
            best = name
    return best


def _sign_test(wins: int, losses: int) -> float:
    """P(at least `wins` of `wins + losses` fair coin flips): how likely this many wins are by chance."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def documents_with_requests(task, limit: int | None = None, samples: list[int] | None = None) -> list[tuple[int, dict, list]]:
    """(doc_id, document, its instances in request order) for the documents `build_all_requests` was just
    given (the same `limit` / `samples`)."""
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    return [(doc_id, doc, sorted(by_doc[doc_id], key=lambda i: i.idx)) for doc_id, doc in task.doc_iterator(limit=limit, samples=samples)]


def document_metric(task, filter_ensemble, metric: str, doc: dict, instances: list, responses: list) -> float:
    """The task's `metric` on one document, given the raw responses to its instances: filtered and
    scored as the harness does (on copies: the instances are left as they were)."""
    copies = []
    for instance, response in zip(instances, responses, strict=True):
        instance = copy.copy(instance)
        instance.resps, instance.filtered_resps = [response], {}
        copies.append(instance)
    filter_ensemble.apply(copies)
    return float(task.process_results(doc, [instance.filtered_resps[filter_ensemble.name] for instance in copies])[metric])


def fingerprint(doc) -> str:
    """A document's content, for equality across splits (datasets repeat documents)."""
    return json.dumps(doc, sort_keys=True, default=str)

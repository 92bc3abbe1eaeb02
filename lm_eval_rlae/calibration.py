"""`calibrate=K`: before a task runs, the ensemble tries its weights and each member alone on K
labelled documents of that task that the evaluation does not read, and keeps whichever scores best.

Why: on a task it never saw, neither an agent nor any fixed weighting can tell which member is
competent from what the members show. A member's confidence says how peaked it is, not whether it is
right (the arithmetic specialist is as sure on language questions it gets wrong), and how well a
member reads the prompt does not say it either (README, "Tasks never trained on"). A task's own
labelled documents do: with 16 of them the better member is found on 8 of 9 held-out tasks. So the
configured policy (an agent, fixed weights) stays where it is at least as good as every member alone
on those documents, and gives way to the better member where it is not.

The documents come from the task's validation split, else its training split, else its few-shot
split: never the split being evaluated, and never a document equal to one being evaluated. They are
built and scored by the harness's own code (`build_all_requests`, the task's filter and metric), with
the task's default prompt settings (few-shot count, no chat template). Tasks the harness cannot load
by name (pass `calibrate_include=DIR`, the `--include_path` of the run, for tasks of your own or
renamed splits), tasks without another
labelled split, and log-likelihood-rolling (perplexity) tasks keep the configured policy, with a
warning.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval.models.utils import postprocess_generated_text

from lm_eval_rlae.engine.fusion import Decoding, FusionEngine
from lm_eval_rlae.policies.base import FixedPolicy, WeightPolicy

logger = logging.getLogger(__name__)
POLICY = "policy"  # the configured weights or agent, among the candidates


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
        self._managers: dict[bool, object] = {}  # with the harness's own tasks or not -> TaskManager

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
            task = self._load(task_name)
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
        task.build_all_requests(samples=indices)
        by_doc: dict[int, list] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        docs = [(doc, sorted(by_doc[doc_id], key=lambda i: i.idx)) for doc_id, doc in task.doc_iterator(samples=indices)]
        scores = {}
        try:
            for name, candidate in self.candidates.items():
                self.engine.use(candidate)
                responses = self._responses(task.OUTPUT_TYPE, [instance for _, instances in docs for instance in instances])
                values, start = [], 0
                for doc, instances in docs:
                    values.append(document_metric(task, filter_, metric, doc, instances, responses[start : start + len(instances)]))
                    start += len(instances)
                scores[name] = sum(values) / len(values)
        finally:
            self.engine.use(self.policy)
        return Calibration(task_name, choose(scores, POLICY, higher), split, len(docs), metric, scores)

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
        """(split, indices of up to `documents` of its documents) from the first labelled split that is
        not the evaluated one and holds documents the evaluation does not read."""
        config = task.config
        evaluated = config.test_split if task.has_test_docs() else config.validation_split
        for split in dict.fromkeys(s for s in (config.validation_split, config.training_split, config.fewshot_split) if s and s != evaluated):
            if split not in task.dataset:
                continue
            config.test_split = split  # the harness builds requests for its test split: point it here
            indices = [i for i, doc in enumerate(task.eval_docs) if fingerprint(doc) not in seen][: self.documents]
            if indices:
                return split, indices
        return None

    def _load(self, task_name: str):
        """The task by name: from `include_path` (default: the project's offline tasks) first, then with
        the harness's own (indexing those takes ~15 s, once)."""
        from lm_eval.tasks import TaskManager

        from lm_eval_rlae.offline.data import TASK_CONFIGS

        paths = str(Path(self.include_path or TASK_CONFIGS))
        for defaults in (False, True):
            if defaults not in self._managers:
                self._managers[defaults] = TaskManager(include_path=paths, include_defaults=defaults)
            if task_name in self._managers[defaults].all_tasks:
                return self._managers[defaults].load(task_name)["tasks"][task_name]
        return None


def choose(scores: dict[str, float], keep: str, higher_is_better: bool = True) -> str:
    """The candidate with the best score; `keep` (the configured policy) on a tie."""
    sign = 1 if higher_is_better else -1
    return max(scores, key=lambda name: (sign * scores[name], name == keep))


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

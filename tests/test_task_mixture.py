"""Training on any harness task: a config's tasks (leaf names, globs, groups) expand to the harness's
leaf tasks with the shares the groups' own scores give them, a per-task split mapping says which split
serves training, selection and the test table, and bad mappings are refused with what to change.

Tiny multiple-choice and generation tasks over local JSONL, shaped like the real cases: `mx_a`/`mx_b`
with train/validation/test, `mx_gen` with train and test only (as gsm8k), `mx_dev_1`/`mx_dev_2` with
dev/validation/test and no training split (as mmlu), and groups over them. No model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from trainer.agents.run import summary
from trainer.agents.tasks import TaskMixture

SIZES = {  # task -> split -> number of documents
    "mx_a": {"train": 6, "validation": 4, "test": 5},
    "mx_b": {"train": 6, "validation": 4, "test": 10},
    "mx_gen": {"train": 10, "test": 3},
    "mx_dev_1": {"dev": 2, "validation": 5, "test": 4},
    "mx_dev_2": {"dev": 2, "validation": 3, "test": 6},
    "mx_dup": {"train": 4, "validation": 3, "test": 2},  # its validation document 1 is train document 2 again
}

_MC = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {files}
{splits}
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_GEN = """\
task: mx_gen
dataset_path: json
dataset_kwargs:
  data_files: {files}
training_split: train
fewshot_split: train
test_split: test
num_fewshot: 9
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_GROUPS = {
    "mx_sized": "group: mx_sized\ntask: [mx_a, mx_b]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n",
    "mx_equal": "group: mx_equal\ntask: [mx_a, mx_b]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: false\n",
    "mx_plain": "group: mx_plain\ntask: [mx_sized, mx_gen]\n",  # no score of its own
    "mx_dev": "group: mx_dev\ntask: [mx_dev_1, mx_dev_2]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n",
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mixture")
    for name, sizes in SIZES.items():
        files = {}
        for split, n in sizes.items():
            files[split] = str(root / f"{name}.{split}.jsonl")
            with open(files[split], "w") as f:
                for i in range(n):
                    split_, i = ("train", 2) if (name, split, i) == ("mx_dup", "validation", 1) else (split, i)
                    f.write(json.dumps({"id": f"{name}/{split_}/{i}", "question": f"{name} {split_} {i}", "label": i % 2, "answer": str(i)}) + "\n")
        if name == "mx_gen":
            (root / f"{name}.yaml").write_text(_GEN.format(files=json.dumps(files)))
        else:
            splits = "\n".join(f"{role}: {split}" for role, split in [("training_split", "train"), ("validation_split", "validation"), ("test_split", "test"), ("fewshot_split", "dev")] if split in sizes)
            (root / f"{name}.yaml").write_text(_MC.format(name=name, files=json.dumps(files), splits=splits))
    for name, text in _GROUPS.items():
        (root / f"{name}.yaml").write_text(text)
    return str(root)


def _ids(task_data) -> list[str]:
    return [document.doc["id"] for document in task_data.documents]


def test_globs_give_each_leaf_the_ratio_and_groups_share_it_as_their_score_weighs_them(tasks_dir):
    mixture = TaskMixture({"mx_[ab]": 1.0, "mx_gen": 2.0}, include_path=tasks_dir)
    assert mixture.shares == pytest.approx({"mx_a": 0.25, "mx_b": 0.25, "mx_gen": 0.5})
    assert mixture.entry_of == {"mx_a": "mx_[ab]", "mx_b": "mx_[ab]", "mx_gen": "mx_gen"}

    sized = TaskMixture({"mx_sized": 1.0, "mx_gen": 1.0}, include_path=tasks_dir)  # by test documents: 5 and 10
    assert sized.shares == pytest.approx({"mx_a": 0.5 * 5 / 15, "mx_b": 0.5 * 10 / 15, "mx_gen": 0.5})
    assert TaskMixture({"mx_equal": 1.0}, include_path=tasks_dir).shares == pytest.approx({"mx_a": 0.5, "mx_b": 0.5})
    # no score of its own: each child is weighed apart (mx_sized by its own rule), as the harness reports them
    plain = TaskMixture({"mx_plain": 1.0}, include_path=tasks_dir)
    assert plain.shares == pytest.approx({"mx_a": 1 / 6, "mx_b": 2 / 6, "mx_gen": 0.5})
    assert plain.record()["mx_b"] == {"share": pytest.approx(1 / 3), "entry": "mx_plain", "splits": {"train": "train", "validation": "validation", "test": "test"}}


@pytest.mark.parametrize("group", ["mx_sized", "mx_equal"])
def test_a_groups_shares_weigh_its_leaves_as_the_harness_aggregates_its_score(tasks_dir, group):
    from lm_eval.tasks import TaskManager

    harness_group = TaskManager(include_path=tasks_dir, include_defaults=False).load([group])["groups"][group]
    mixture = TaskMixture({group: 1.0}, include_path=tasks_dir)
    acc = {"mx_a": 0.2, "mx_b": 0.8}
    metrics = {leaf: {"acc,none": acc[leaf], "sample_len": SIZES[leaf]["test"]} for leaf in acc}  # as lm_eval reports them
    assert harness_group.aggregate(metrics)["acc,none"] == pytest.approx(summary({leaf: [a] for leaf, a in acc.items()}, mixture.shares)["mean"])


def test_the_validation_mean_weighs_tasks_by_their_shares():
    rewards = {"a": [1.0, 1.0], "b": [0.0, 0.0, 1.0]}
    assert summary(rewards)["mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary(rewards, {"a": 0.25, "b": 0.75})["mean"] == pytest.approx(0.25 + 0.75 / 3)


def test_mapped_splits_and_slices_are_what_the_documents_come_from(tasks_dir):
    splits = {"mx_dev": {"train": "validation", "validation": "dev"}, "mx_gen": {"train": "train[:8]", "validation": "train[-2:]"}}
    mixture = TaskMixture({"mx_dev": 1.0, "mx_gen": 1.0}, splits, include_path=tasks_dir)
    train, validation = mixture.load("train"), mixture.load("validation")
    assert _ids(train["mx_dev_1"]) == [f"mx_dev_1/validation/{i}" for i in range(5)]
    assert _ids(validation["mx_dev_2"]) == [f"mx_dev_2/dev/{i}" for i in range(2)]
    assert _ids(train["mx_gen"]) == [f"mx_gen/train/{i}" for i in range(8)]
    assert _ids(validation["mx_gen"]) == ["mx_gen/train/8", "mx_gen/train/9"]
    assert _ids(mixture.load("train", limit=3)["mx_gen"]) == [f"mx_gen/train/{i}" for i in range(3)]
    assert (train["mx_gen"].split, train["mx_dev_1"].split) == ("train[:8]", "validation")  # what the score cache is keyed by
    # The slice is read as its split, so the harness's rule holds: 9 examples from the 10 train
    # documents are every one but the document itself.
    for document in [*train["mx_gen"].documents, *validation["mx_gen"].documents]:
        shown = [f"Q: mx_gen train {i}\nA: {i}" in document.contexts[0] for i in range(10)]
        assert shown == [f"mx_gen/train/{i}" != document.doc["id"] for i in range(10)], document.doc["id"]
    assert mixture.record()["mx_gen"]["splits"] == {"train": "train[:8]", "validation": "train[-2:]", "test": "test"}


def test_a_training_document_duplicated_in_validation_is_left_out_of_it(tasks_dir):
    mixture = TaskMixture({"mx_dup": 1.0}, include_path=tasks_dir)
    validation = mixture.load("validation")["mx_dup"]
    assert _ids(validation) == ["mx_dup/validation/0", "mx_dup/validation/2"] and validation.split == "validation minus train"
    assert _ids(mixture.load("test")["mx_dup"]) == ["mx_dup/test/0", "mx_dup/test/1"]  # the harness's test split stays whole
    assert "mx_dup/train/2" in _ids(mixture.load("train")["mx_dup"])


def test_a_mapped_split_is_cached_under_the_split_read(tasks_dir, tmp_path):
    """Two configs reading different splits for `train` never share scores (the documents of these
    tasks have no hash of their own: their keys are positions in the split read)."""
    from trainer.agents.scores import ScoreCache, ScoredDocument

    class Cache(ScoreCache):
        def __init__(self):
            self.dir = tmp_path
            self.scored = []

        def _score(self, task, documents):
            self.scored += [document.doc["id"] for document in documents]
            return [ScoredDocument(np.zeros(1, dtype=np.float32), []) for _ in documents]

        def _write(self, path, by_key):
            path.write_text(json.dumps(list(by_key)))

        def _read(self, path):
            return {key: ScoredDocument(np.zeros(1, dtype=np.float32), []) for key in json.loads(path.read_text())} if path.is_file() else {}

    first = TaskMixture({"mx_dev": 1.0}, {"mx_dev": {"train": "validation", "validation": "dev"}}, include_path=tasks_dir).load("train")
    second = TaskMixture({"mx_dev": 1.0}, {"mx_dev": {"train": "dev", "validation": "validation"}}, include_path=tasks_dir).load("train")
    cache = Cache()
    cache.documents(first["mx_dev_1"])
    cache.documents(second["mx_dev_1"])
    assert cache.scored == [*_ids(first["mx_dev_1"]), *_ids(second["mx_dev_1"])]
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == ["mx_dev_1.dev.safetensors", "mx_dev_1.validation.safetensors"]


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"mx_a": {"validation": "dev"}}, "task 'mx_a' has no split 'dev' (its dataset has train, validation, test"),
        ({"mx_a": {"validation": "train"}}, "task 'mx_a': train (train) and validation (train) share documents of its split 'train'"),
        ({"mx_a": {"train": "train[:4]", "validation": "train[3:]"}}, "train (train[:4]) and validation (train[3:]) share documents"),
        ({"mx_a": {"test": "validation"}}, "validation (validation) and test (validation) share documents"),
        ({"mx_a": {"train": "train[abc]"}}, "task 'mx_a' has no split 'train[abc]'"),
        ({"mx_a": {"train": "train[4:2]"}}, "'train[4:2]' holds no document"),
        ({"mx_a": {"training": "train"}}, "give {role: split} with roles among train, validation, test"),
        ({"mx_a": {"train": "train"}, "mx_*": {"train": "train"}}, "task 'mx_a' is matched by splits ['mx_a', 'mx_*']"),
    ],
)
def test_a_bad_split_mapping_is_refused_with_what_exists(tasks_dir, splits, message):
    with pytest.raises(ValueError) as error:
        TaskMixture({"mx_a": 1.0, "mx_b": 1.0}, splits, include_path=tasks_dir)
    assert message in str(error.value), str(error.value)


def test_disjoint_slices_of_one_split_serve_training_and_selection(tasks_dir):
    mixture = TaskMixture({"mx_a": 1.0}, {"mx_a": {"train": "train[:3]", "validation": "train[3:]"}}, include_path=tasks_dir)
    assert [len(mixture.load(role)["mx_a"]) for role in ("train", "validation")] == [3, 3]


def test_a_group_without_a_split_to_train_on_is_refused_and_can_still_be_tested(tasks_dir):
    with pytest.raises(ValueError) as error:
        TaskMixture({"mx_dev": 1.0, "mx_a": 1.0}, include_path=tasks_dir, roles=("train", "validation"))
    message = str(error.value)
    assert message.startswith("'mx_dev' (2 tasks): no split to train on") and "the datasets have dev, test, validation" in message, message
    assert "splits: {mx_dev: {train: 'validation[:80%]', validation: 'validation[80%:]'}}" in message, message
    with pytest.raises(ValueError, match="'mx_gen': no split to serve validation"):
        TaskMixture({"mx_gen": 1.0}, include_path=tasks_dir, roles=("train", "validation"))
    tested = TaskMixture({"mx_dev": 1.0}, include_path=tasks_dir, roles=("test",))  # e.g. by rlae-agent-table
    assert len(tested.load("test")["mx_dev_2"]) == 6
    with pytest.raises(ValueError, match="'mx_dev' \\(2 tasks\\): no split to train on"):
        tested.load("train")


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"mx_sized": 1.0, "mx_a": 1.0}, "task 'mx_a' comes from both 'mx_sized' and 'mx_a': name it once"),
        ({"mx_a": 0.0}, "give each task, glob or group a positive ratio"),
    ],
)
def test_bad_tasks_are_refused(tasks_dir, entries, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskMixture(entries, include_path=tasks_dir)

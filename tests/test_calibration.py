"""`calibrate=K`: per task, the configured weights or each member alone, chosen on K labelled documents
the evaluation does not read.

On `route_mc_sum` the first tiny member alone is right on every document and the second is wrong, on
`route_mc_story` the other way round (tests/tiny_route.py), so uniform weights are right on some of
each and calibration must find the member of each task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import tiny_route

TASKS = ["route_mc_sum", "route_mc_story"]


@pytest.fixture(scope="module")
def route_tasks(tmp_path_factory, bpe_member, sp_member) -> str:
    return tiny_route.write_route_tasks(tmp_path_factory.mktemp("route"), [bpe_member, sp_member])


def _evaluate(lm, tasks: list[str], include_path: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, batch_size=8)["results"]


def test_calibration_runs_each_task_with_the_member_right_on_it(bpe_member, sp_member, route_tasks):
    from lm_eval_rlae.lm import RLAELM

    plain = _evaluate(RLAELM(members=[bpe_member, sp_member], batch_size=8), TASKS, route_tasks)
    lm = RLAELM(members=[bpe_member, sp_member], batch_size=8, calibrate=100, calibrate_include=route_tasks)  # every validation document
    calibrated = _evaluate(lm, TASKS, route_tasks)

    sum_task, story_task = (lm.calibrator.calibrations[task] for task in TASKS)
    assert (sum_task.chosen, story_task.chosen) == (f"{bpe_member} alone", f"{sp_member} alone")
    for task, calibration in zip(TASKS, (sum_task, story_task)):
        validation = len(Path(route_tasks, f"{task}.validation.jsonl").read_text().splitlines())
        assert (calibration.split, calibration.documents, calibration.metric) == ("validation", validation, "acc")
        assert calibration.scores[calibration.chosen] == 1.0  # the member of the task is right on all of them
    assert sum_task.scores[f"{sp_member} alone"] == 0.0 and story_task.scores[f"{bpe_member} alone"] == 0.0
    for task in TASKS:
        assert calibrated[task]["acc,none"] == 1.0
    assert min(plain[task]["acc,none"] for task in TASKS) < 1.0  # uniform weights alone are not enough
    assert lm.engine.policy is lm.calibrator.policy  # the configured weights are back after each task


def test_calibration_never_reads_a_document_being_evaluated(bpe_member, sp_member, route_tasks, tmp_path):
    """A task whose validation split holds its test documents: calibration takes its training split."""
    from lm_eval_rlae.lm import RLAELM

    root = Path(tmp_path)
    yaml = Path(route_tasks, "route_mc_sum.yaml").read_text().replace("route_mc_sum.validation.jsonl", "route_mc_sum.test.jsonl")
    (root / "leaky.yaml").write_text(yaml.replace("task: route_mc_sum", "task: route_mc_leaky"))
    lm = RLAELM(members=[bpe_member, sp_member], batch_size=8, calibrate=4, calibrate_include=str(root))
    _evaluate(lm, ["route_mc_leaky"], str(root))
    calibration = lm.calibrator.calibrations["route_mc_leaky"]
    assert (calibration.split, calibration.documents) == ("train", 4)
    assert calibration.scores[f"{bpe_member} alone"] == 1.0 and calibration.scores[f"{sp_member} alone"] == 0.0

    # with no labelled documents outside the evaluated ones, the configured policy is kept, with the reason
    (root / "only_test.yaml").write_text(
        yaml.replace("task: route_mc_sum", "task: route_mc_only_test").replace("route_mc_sum.train.jsonl", "route_mc_sum.test.jsonl")
    )
    lm = RLAELM(members=[bpe_member, sp_member], batch_size=8, calibrate=4, calibrate_include=str(root))
    _evaluate(lm, ["route_mc_only_test"], str(root))
    calibration = lm.calibrator.calibrations["route_mc_only_test"]
    assert calibration.chosen == "policy" and "no labelled split" in calibration.reason and not calibration.scores


def test_calibration_builds_its_documents_as_the_run_does(bpe_member, sp_member, route_tasks):
    """The run's own task and prompt options (here a system instruction): calibration needs no
    calibrate_include for a task of the run's --include_path, and its contexts read as the run's."""
    from lm_eval_rlae.lm import RLAELM

    lm = RLAELM(members=[bpe_member, sp_member], batch_size=8, calibrate=4)
    seen = []
    score = lm.engine.score
    lm.engine.score = lambda requests: seen.extend(requests) or score(requests)
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm_eval.simple_evaluate(model=lm, tasks=["route_mc_sum"], task_manager=TaskManager(include_path=route_tasks, include_defaults=False),
                            system_instruction="Answer briefly.", limit=2)
    calibration = lm.calibrator.calibrations["route_mc_sum"]
    assert (calibration.split, calibration.documents) == ("validation", 4) and calibration.reason is None
    assert seen and all(context.startswith("Answer briefly.") for context, _ in seen)


def test_calibration_outside_the_harness_loads_the_task_by_name_or_keeps_the_policy(bpe_member, sp_member, route_tasks):
    from lm_eval.api.instance import Instance

    from lm_eval_rlae.lm import RLAELM

    def requests(task):
        doc = {"prompt": "Q: 1+1=\nA:", "choices": [" 2", " 3"], "label": 0}
        return [Instance("loglikelihood", doc, ("Q: 1+1=\nA:", choice), i, metadata=(task, 0, 1)) for i, choice in enumerate(doc["choices"])]

    lm = RLAELM(members=[bpe_member, sp_member], batch_size=8, calibrate=4, calibrate_include=route_tasks)
    assert len(lm.loglikelihood(requests("route_mc_story"))) == 2
    assert lm.calibrator.calibrations["route_mc_story"].chosen == f"{sp_member} alone"
    assert len(lm.loglikelihood(requests("no_such_task_anywhere"))) == 2
    calibration = lm.calibrator.calibrations["no_such_task_anywhere"]
    assert calibration.chosen == "policy" and "calibrate_include" in calibration.reason


def test_bad_calibrate_is_refused_before_any_model_loads():
    from lm_eval_rlae.lm import RLAELM

    for bad in (-1, "many"):
        with pytest.raises(ValueError, match=f"calibrate={bad}: give the number of labelled documents"):
            RLAELM(members=["no-such-model-anywhere", "another"], calibrate=bad)


def test_a_member_replaces_the_policy_only_with_evidence():
    from lm_eval_rlae.calibration import choose

    policy = [1.0] * 4 + [0.0] * 12
    clearly = [1.0] * 9 + [0.0] * 7  # right on 5 more, wrong on none more: sign test p = 1/32
    barely = [0.0] * 2 + [1.0] * 4 + [0.0] * 10  # as often right, on other documents: 2 wins, 2 losses, p = 0.69
    assert choose({"policy": policy, "a": clearly, "b": barely}, "policy") == "a"
    assert choose({"policy": policy, "b": barely}, "policy") == "policy"
    assert choose({"policy": policy, "a": clearly, "c": [1.0] * 10 + [0.0] * 6}, "policy") == "c"  # of those with evidence, the best
    assert choose({"policy": [1.0] * 16, "a": policy}, "policy", higher_is_better=False) == "a"  # an error rate: lower is better


def test_rlae_folds_calibrates_as_the_runtime_does():
    """`rlae-folds --calibrate K` reads the choice off cached validation scores with the runtime's rule."""
    from trainer.agents.folds import calibrated

    docs = [f"d{i}" for i in range(8)]
    validation = {
        "a alone": {"t1": dict.fromkeys(docs, 1.0), "t2": dict(zip(docs, [1.0, 0.0] * 4))},
        "b alone": {"t1": dict.fromkeys(docs, 0.0), "t2": dict.fromkeys(docs, 0.0)},
        "RLAE_PPO": {"t1": dict.fromkeys(docs, 0.0), "t2": dict(zip(docs, [0.0, 1.0] * 4))},
    }
    test = {label: {t: {"z": float(i)} for t in ("t1", "t2")} for i, label in enumerate(validation)}
    out = calibrated(validation, test, ["RLAE_PPO"], documents=8)
    assert out == {"RLAE_PPO, calibrated": {"t1": test["a alone"]["t1"], "t2": test["RLAE_PPO"]["t2"]}}


def test_rlae_compare_runs_each_agent_alone_and_calibrated():
    from lm_eval_rlae.compare.config import CompareConfig, methods

    config = CompareConfig(members=["/m/a", "/m/b"], tasks=["t"], agents={"A": "/agents/a"}, calibrate=8)
    out = methods(config)
    assert out["A"] == ("rlae", "members=[/m/a,/m/b],agent=/agents/a,calibrate=0")
    assert out["A, calibrated"] == ("rlae", "members=[/m/a,/m/b],agent=/agents/a,calibrate=8")
    assert out["uniform, calibrated"] == ("rlae", "members=[/m/a,/m/b],weights=uniform,calibrate=8")
    assert not [label for label in methods(dataclasses.replace(config, calibrate=0)) if label.endswith("calibrated")]

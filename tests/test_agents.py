"""Learned agents: they learn (RLAE_PPO and RLAE_MAPPO beat uniform weights on held-out documents of
tasks where the right member depends on the input), run through the harness as `agent=`, resume
from a kill exactly, and refuse checkpoints that do not fit with a message that says why.

The members are the two tiny ones of different tokenizer families; the tasks (tests/tiny_route.py)
are built from them so that each member alone is right on one kind of input and wrong on the other.
Three members (the third family, a Unigram tokenizer with `<unk>`) on three kinds of input: RLAE_PPO
(a Dirichlet over three) and RLAE_MAPPO (three actors, a ratio each) learn them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_route
from lm_eval_rlae import dataclass_config
from lm_eval_rlae.policies.agent import AgentCheckpointError, AgentPolicy, load_agent
from trainer.agents.run import TrainConfig, load_config
from trainer.agents.train import train


@pytest.fixture(scope="module")
def route_tasks(tmp_path_factory, bpe_member, sp_member) -> str:
    return tiny_route.write_route_tasks(tmp_path_factory.mktemp("route"), [bpe_member, sp_member])


def _config(bpe_member, sp_member, route_tasks, out, **overrides) -> TrainConfig:
    values = dict(
        members=[bpe_member, sp_member],
        tasks={"route_mc": 1.0, "route_gen": 1.0},
        include_path=route_tasks,
        span_length=2,
        val_docs=100,
        rows=32,
        steps_per_collect=4,
        updates_per_epoch=8,
        epochs=3,
        minibatch=64,
        lr=3e-3,
        cache=str(Path(out).parent / "scores"),
        out=str(out),
        # step by step: a run is then the same from one test session to the next (drafting rounds the
        # members' states by forwards whose widths follow measured speed); the env's drafting has its own tests
        speculative=False,
    )
    return TrainConfig(**(values | overrides))


def _harness(run_route, model_args: str) -> dict[str, float]:
    results = run_route("rlae", model_args)
    return {"route_mc": results["route_mc"]["acc,none"], "route_gen": results["route_gen"]["exact_match,word"]}


@pytest.fixture(scope="module")
def run_route(route_tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=route_tasks, include_defaults=False)

    def run(model, model_args):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["route_mc", "route_gen"], task_manager=manager, batch_size=16)
        return out["results"]

    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bpe_member, sp_member, route_tasks) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agents")
    return {algorithm: train(_config(bpe_member, sp_member, route_tasks, root / algorithm, algorithm=algorithm)) for algorithm in ("ppo", "mappo")}


@pytest.mark.parametrize("algorithm", ["ppo", "mappo"])
def test_agent_beats_uniform_on_held_out_documents(trained, run_route, bpe_member, sp_member, algorithm):
    members = f"members=[{bpe_member},{sp_member}]"
    uniform = _harness(run_route, members)
    alone = [_harness(run_route, f"{members},weights={w}") for w in ("[1,0]", "[0,1]")]
    agent = _harness(run_route, f"{members},agent={trained[algorithm] / 'best'}")
    # built so: each member alone is right on one kind of input, which a fixed weighting cannot serve both
    assert max(a["route_mc"] for a in alone) < 0.75
    for task in ("route_mc", "route_gen"):
        assert agent[task] >= uniform[task] + 0.25, (algorithm, task, agent, uniform)
    history = json.loads((trained[algorithm] / "validation.json").read_text())
    assert history["epochs"][-1]["validation"]["mean"] > history["baselines"]["uniform"]["mean"]


def test_table_env_is_the_harness(trained, tmp_path, route_tasks, bpe_member, sp_member):
    """rlae-agent-table scores every method through the training env (choice scores computed once and
    mixed per method, generations decoded live): per document that is what `lm_eval --model rlae` gives,
    for a member alone, for fixed weights and for an agent."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from trainer.agents.agent_table import method_scores
    from trainer.agents.run import Run

    agent = str(trained["mappo"] / "best")
    run = Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "table", test_docs=10_000), splits=("test",))
    table, _ = method_scores(run, [0.3, 0.7], {"agent": agent})
    manager = TaskManager(include_path=route_tasks, include_defaults=False)
    members = f"members=[{bpe_member},{sp_member}]"
    for label, args in {f"{sp_member} alone": "weights=[0,1]", "best fixed": "weights=[0.3,0.7]", "agent": f"agent={agent},calibrate=0"}.items():
        out = lm_eval.simple_evaluate(model="rlae", model_args=f"{members},{args}", tasks=["route_mc", "route_gen"], task_manager=manager, batch_size=16, log_samples=True)
        for task, metric in (("route_mc", "acc"), ("route_gen", "exact_match")):
            harness = {f"{task}/{sample['doc_id']}": float(sample[metric]) for sample in out["samples"][task]}
            assert table[label][task] == harness, (label, task)


def test_compare_runs_every_method_through_the_harness_and_reuses_finished_runs(trained, tmp_path, route_tasks, bpe_member, sp_member, monkeypatch):
    """rlae-compare: members alone (hf), uniform (also gated), perplexity, best fixed and both agents through the
    harness's command line, the upper bounds, paired differences, cost and plots; run again, it runs
    only what is missing."""
    from lm_eval_rlae.compare.command import Runs, compare
    from lm_eval_rlae.compare.config import CompareConfig

    config = CompareConfig(
        members=[bpe_member, sp_member], tasks=["route_mc", "route_gen"], limit=24, include_path=route_tasks, best_fixed=[0.3, 0.7], gate=0.9,
        agents={"RLAE_PPO": str(trained["ppo"] / "best"), "RLAE_MAPPO": str(trained["mappo"] / "best")}, device="cpu", output=str(tmp_path / "compare"),
        calibrate=4,
    )
    out = compare(config)
    summary = json.loads((out / "table.json").read_text())
    labels = [f"{Path(bpe_member).name} alone", f"{Path(sp_member).name} alone", "uniform", "uniform, gate=0.9", "perplexity", "best fixed",
              "RLAE_PPO", "RLAE_MAPPO", "uniform, calibrated", "RLAE_PPO, calibrated", "RLAE_MAPPO, calibrated", "oracle routing", "per-document oracle"]
    assert list(summary["overall"]) == labels
    assert all(summary["tasks"][t][label]["n"] == 24 for t in config.tasks for label in labels)
    overall = {label: summary["overall"][label]["acc"] for label in labels}
    assert overall["per-document oracle"] >= overall["oracle routing"] >= max(overall[labels[0]], overall[labels[1]])
    for agent in ("RLAE_PPO", "RLAE_MAPPO"):  # the agents learned these tasks (test_agent_beats_uniform_on_held_out_documents)
        diff, low, _ = summary["paired"][agent]["uniform"]
        assert diff > 0.1 and low > 0, (agent, summary["paired"][agent])
    assert summary["methods"]["RLAE_PPO"][1].endswith(",calibrate=0") and summary["methods"]["RLAE_PPO, calibrated"][1].endswith(",calibrate=4")
    for label in labels[:11]:
        cost = summary["cost"][label]
        assert cost["generate_until"]["requests"] == 24 and cost["generated_tokens"] > 0 and cost["peak_rss_gib"] > 0.1
        assert cost["loglikelihood"]["requests"] > 24  # every choice of every document
    for name in ("table.md", "accuracy.png", "weights_RLAE_PPO.png", "weights_RLAE_MAPPO.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "vs best single member" in (out / "table.md").read_text()

    ran, original_run = [], Runs.run

    def counted(self, label, model, args, tasks, progress):
        ran.append((label, tasks))
        return original_run(self, label, model, args, tasks, progress)

    monkeypatch.setattr(Runs, "run", counted)
    compare(config)
    assert ran == []  # everything reused
    (out / "runs" / "perplexity" / "route_gen.json").unlink()
    compare(config)
    assert ran == [("perplexity", ["route_gen"])]


def test_benchmark_times_the_agent_beside_the_members(trained, bpe_member, sp_member, capsys):
    from lm_eval_rlae.benchmark import main

    agent = str(trained["ppo"] / "best")
    main(["--members", f"{bpe_member},{sp_member}", "--prompts", "3", "--max-gen-toks", "4", "--batch-size", "2", "--repeats", "1", "--device", "cpu", "--agent", agent])
    out = capsys.readouterr().out
    for label in (f"rlae agent={agent}", f"rlae speculative agent={agent}"):  # step by step, and drafted and verified
        assert re.search(rf"^\| {re.escape(label)} \| [\d.]+ \| [\d.]+ \| \d+ / \d+ \|$", out, flags=re.M)
        assert re.search(rf"^{re.escape(label)} / members, batch 2: generate_until \d+\.\d\d", out, flags=re.M)


def test_mappo_actors_see_only_their_member(trained):
    _, actor = load_agent(str(trained["mappo"] / "best"))
    obs = torch.randn(4, actor.encoders[0].slices["shared"].stop)
    base = actor(obs)[0]
    hidden_1 = actor.encoders[0].slices["hidden.1"]
    changed = obs.clone()
    changed[:, hidden_1] = torch.randn(4, hidden_1.stop - hidden_1.start)  # (a shift alone is layer-normalised away)
    alpha = actor(changed)[0]
    assert torch.allclose(alpha[:, 0], base[:, 0]) and not torch.allclose(alpha[:, 1], base[:, 1])


def test_training_writes_what_an_rl_engineer_reads(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trained["ppo"]
    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    for tag in ("loss/policy", "loss/value", "loss/entropy", "train/approx_kl", "train/clip_fraction", "train/explained_variance",
                "speed/env_steps_per_s", "train/return", "validation/agent", "validation/uniform"):
        assert tag in tags, tag
    assert any(tag.startswith("weight_task/route_mc/") for tag in tags) and any(tag.startswith("weight_span/1/") for tag in tags)
    spec = json.loads((out / "best" / "agent.json").read_text())
    assert spec["algorithm"] == "ppo" and spec["state"] == "members" and spec["span_length"] == 2
    assert spec["training"]["tasks"] == {"route_mc": 1.0, "route_gen": 1.0} and "validation" in spec["training"]
    leaves = {"route_mc": {"share": 0.5, "entry": "route_mc", "splits": {"train": "train", "validation": "validation", "test": "test"}}}
    assert spec["training"]["leaf_tasks"]["route_mc"] == leaves["route_mc"] and set(spec["training"]["leaf_tasks"]) == {"route_mc", "route_gen"}
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == "ppo" and config["leaf_tasks"] == spec["training"]["leaf_tasks"]


@pytest.mark.parametrize("mc_rows", [0, 16])
def test_resumed_run_is_the_run_that_was_not_stopped(tmp_path, bpe_member, sp_member, route_tasks, mc_rows):
    """Stopped after epoch 1 and run again, training ends where an uninterrupted run ends, bit for bit
    (with rows for multiple choice apart, each kind's sampler resumes too). Step by step: speculative
    decoding gives the same texts, but members' states rounded by forwards of widths chosen by measured
    speed, so the agent's observations differ in their last bits from run to run."""
    small = dict(updates_per_epoch=2, epochs=2, val_docs=8, mc_rows=mc_rows)
    straight = train(_config(bpe_member, sp_member, route_tasks, tmp_path / "straight", **small))
    train(_config(bpe_member, sp_member, route_tasks, tmp_path / "resumed", **(small | {"epochs": 1})))
    resumed = train(_config(bpe_member, sp_member, route_tasks, tmp_path / "resumed", **small))
    a, b = load_file(str(straight / "last" / "actor.safetensors")), load_file(str(resumed / "last" / "actor.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mc_rows_draw_only_multiple_choice_documents(tmp_path, bpe_member, sp_member, route_tasks):
    from trainer.agents.run import Run

    run = Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "run", rows=4, mc_rows=12, val_docs=4))
    expected = ["route_gen"] * 4 + ["route_mc"] * 12
    run.env.reset()
    assert [episode.document.task.name for episode in run.env.episodes] == expected
    for _ in range(3):  # rows that finish are reset, each from its own sampler
        done = np.flatnonzero(run.env.step(np.ones((16, 2)))[2])
        run.env.reset(done)
        assert [run.env.episodes[i].document.task.name for i in done] == [expected[i] for i in done]
    with pytest.raises(SystemExit, match="no training task is generate_until"):
        Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "mc", tasks={"route_mc": 1.0}, mc_rows=8, val_docs=4))


def test_score_cache_scores_only_new_documents(tmp_path, bpe_member, sp_member, route_tasks, monkeypatch):
    """More documents per task than the cache holds: only the new ones are scored, and they equal a
    cache built from scratch."""
    from trainer.agents.scores import ScoreCache
    from trainer.agents.run import Run

    scored = []
    original = ScoreCache._score
    monkeypatch.setattr(ScoreCache, "_score", lambda self, task, documents: scored.append((task.split, len(documents))) or original(self, task, documents))
    small = dict(tasks={"route_mc": 1.0}, val_docs=4)
    Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "grown" / "run", train_docs=6, **small))
    grown = Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "grown" / "run", train_docs=12, **small))
    assert scored == [("train", 6), ("validation", 4), ("train", 6)]
    fresh = Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "fresh" / "run", train_docs=12, **small))
    for a, b in zip(grown.scored["train"]["route_mc"], fresh.scored["train"]["route_mc"], strict=True):
        np.testing.assert_allclose(a.obs, b.obs, atol=1e-4)
        for choices_a, choices_b in zip(a.scored, b.scored, strict=True):
            for x, y in zip(choices_a, choices_b, strict=True):
                np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)


def test_killed_run_resumes_from_its_checkpoint(tmp_path, bpe_member, sp_member, route_tasks):
    config = _config(bpe_member, sp_member, route_tasks, tmp_path / "run", updates_per_epoch=2, epochs=3, val_docs=8)
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "trainer.agents.train", "--config", str(path)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:  # kill it as soon as the first epoch's checkpoint is written
        if "epoch 1:" in line:
            break
    checkpoint = tmp_path / "run" / "checkpoint" / "state.json"
    while not checkpoint.exists():
        pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert "resumed from" in finished.stderr and "after epoch" in finished.stderr
    history = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]


def test_another_config_in_the_same_directory_is_refused(tmp_path, bpe_member, sp_member, route_tasks):
    train(_config(bpe_member, sp_member, route_tasks, tmp_path / "run", updates_per_epoch=1, epochs=1, val_docs=4))
    with pytest.raises(SystemExit, match="another config.*--restart"):
        train(_config(bpe_member, sp_member, route_tasks, tmp_path / "run", updates_per_epoch=1, epochs=1, val_docs=4, lr=0.5))


# ----------------------------------------------------------------------------- distributed rollouts (Ray)


@pytest.fixture
def ray_cluster():
    """A local Ray cluster of this machine's cores, shut down after the test."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def _kill(ray, worker) -> int:
    pid = ray.get(worker.pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_rollout_worker_ends_its_episodes_truncated_and_is_replaced(ray_cluster, tmp_path, bpe_member, sp_member, route_tasks):
    from trainer.agents.rollouts import RayEnv
    from trainer.agents.run import Run

    config = _config(bpe_member, sp_member, route_tasks, tmp_path / "run", rows=3, mc_rows=4, val_docs=4, rollout_workers=2)
    learner = Run(config, splits=("train",))
    env = RayEnv(config, learner.env.action_space, learner.env.observation_space)
    assert env.worker_of == [0, 0, 0, 0, 1, 1, 1] and env.local == [0, 1, 2, 3, 0, 1, 2]  # rows: 2 + 2 | 1 + 2
    obs, info = env.reset()
    assert obs.shape == (7, learner.features.layout.size) and [i["task"] for i in info] == ["route_gen"] * 2 + ["route_mc"] * 2 + ["route_gen"] + ["route_mc"] * 2
    generation = [0, 1, 4]  # one step of a generation document does not end it
    obs, _, terminated, truncated, _ = env.step(np.ones((3, 2)), generation)
    before = obs[2].copy()
    old_pid = _kill(ray_cluster, env.workers[1])
    obs, reward, terminated, truncated, _ = env.step(np.ones((3, 2)), generation)
    assert truncated.tolist() == [False, False, True] and reward[2] == 0 and not terminated[2]
    np.testing.assert_array_equal(obs[2], before)  # cut at its last observation
    assert env.lost == {4, 5, 6} and env.restarts == [0, 1]
    obs, info = env.reset([4, 5, 6])  # the Collector resets the cut rows: on the restarted worker
    assert ray_cluster.get(env.workers[1].pid.remote()) != old_pid and env.lost == set()
    _, _, terminated, truncated, _ = env.step(np.ones((3, 2)), [4, 5, 6])
    assert not truncated.any() and terminated[1:].all()  # its multiple-choice rows end in one step, as ever
    env.close()


def test_ray_rollouts_learn_as_one_process_does_through_a_killed_worker(ray_cluster, trained, tmp_path, bpe_member, sp_member, route_tasks, monkeypatch):
    """Two Ray workers collect the same number of episodes per update as one process; one of them is
    killed in the middle of the second epoch's collection. The run goes on with the learner's state,
    and its validation curve has the shape of the one-process run's."""
    from trainer.agents import rollouts

    steps, kills, original = [], [], rollouts.RayEnv.step

    def step(self, action, env_id=None):
        steps.append(1)
        if len(steps) == 8 * 4 + 2:  # epoch 2's first collection (8 updates x 4 steps per epoch)
            kills.append(_kill(ray_cluster, self.workers[1]))
        return original(self, action, env_id)

    monkeypatch.setattr(rollouts.RayEnv, "step", step)
    out = train(_config(bpe_member, sp_member, route_tasks, tmp_path / "ray", rollout_workers=2))
    assert len(kills) == 1
    ray_curve = json.loads((out / "validation.json").read_text())
    one_curve = json.loads((trained["ppo"] / "validation.json").read_text())
    uniform = one_curve["baselines"]["uniform"]["mean"]
    assert ray_curve["baselines"]["uniform"]["mean"] == uniform
    assert [e["env_steps"] for e in ray_curve["epochs"]] == [e["env_steps"] for e in one_curve["epochs"]]
    for curve in (ray_curve, one_curve):  # both rise well above uniform and end close together
        assert curve["epochs"][-1]["validation"]["mean"] >= uniform + 0.2, curve
    assert abs(ray_curve["epochs"][-1]["validation"]["mean"] - one_curve["epochs"][-1]["validation"]["mean"]) <= 0.2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    restarts = [e.value for e in EventAccumulator(str(out / "tb")).Reload().Scalars("rollouts/worker_restarts")]
    assert restarts[0] == 0 and restarts[-1] == 1


# ----------------------------------------------------------------------------- checkpoints that do not fit


def _copy(trained, tmp_path) -> Path:
    import shutil

    target = tmp_path / "agent"
    shutil.copytree(trained["ppo"] / "best", target)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "actor.safetensors").write_bytes((d / "actor.safetensors").read_bytes()[:100]), "truncated or corrupt"),
        (lambda d: (d / "agent.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "actor.safetensors").unlink(), "has no actor.safetensors"),
        (lambda d: (d / "agent.json").write_text(json.dumps(json.loads((d / "agent.json").read_text()) | {"format": 99})), "format 1"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(trained, tmp_path, bpe_member, sp_member, damage, message):
    directory = _copy(trained, tmp_path)
    damage(directory)
    with pytest.raises(AgentCheckpointError, match=message):
        AgentPolicy.load(str(directory), [bpe_member, sp_member])


def test_agent_for_other_members_or_order_is_refused(trained, bpe_member, sp_member):
    with pytest.raises(AgentCheckpointError, match=r"trained for members=\[.*\] \(in that order\).*pass members="):
        AgentPolicy.load(str(trained["ppo"] / "best"), [sp_member, bpe_member])
    with pytest.raises(AgentCheckpointError, match="neither a directory nor a shipped agent"):
        AgentPolicy.load("no-such-agent", [bpe_member, sp_member])


def test_agent_with_another_state_layout_is_refused(trained, tmp_path, bpe_member, sp_member):
    directory = _copy(trained, tmp_path)
    spec = json.loads((directory / "agent.json").read_text())
    spec["layout"][0][1] += 1  # a hidden state one wider than these members have
    (directory / "agent.json").write_text(json.dumps(spec))
    with pytest.raises(AgentCheckpointError, match="does not match the network|laid out as"):
        from lm_eval_rlae.lm import RLAELM

        RLAELM(members=f"[{bpe_member},{sp_member}]", agent=str(directory), device="cpu")


def test_agent_and_weights_together_are_refused(trained, bpe_member, sp_member):
    from lm_eval_rlae.lm import RLAELM

    with pytest.raises(ValueError, match="not both"):
        RLAELM(members=f"[{bpe_member},{sp_member}]", agent=str(trained["ppo"] / "best"), weights="[0.5,0.5]")


# ----------------------------------------------------------------------------- three members


@pytest.fixture(scope="module")
def three_members(bpe_member, sp_member, unigram_member) -> list[str]:
    return [bpe_member, sp_member, unigram_member]


@pytest.fixture(scope="module")
def route3_tasks(tmp_path_factory, three_members) -> str:
    return tiny_route.write_route_tasks(tmp_path_factory.mktemp("route3"), three_members, n_mc=900, n_gen=240)


@pytest.fixture(scope="module")
def trained_three(tmp_path_factory, three_members, route3_tasks) -> tuple[dict[str, Path], list[tuple]]:
    """Both agents for three members, and the shape of MAPPO's old log-probs at each update. Cheaper
    than the pair's: most rows draw the cached multiple-choice documents, a few decode generation ones
    (the decision at the end of a prompt is the same state in both kinds of task)."""
    from trainer.agents.algorithms import MAPPO

    root, shapes, original = tmp_path_factory.mktemp("agents3"), [], MAPPO._preprocess_batch

    def recorded(self, batch, buffer, indices):
        batch = original(self, batch, buffer, indices)
        shapes.append(tuple(batch.logp_old.shape))
        return batch

    small = dict(members=three_members, rows=4, mc_rows=60, updates_per_epoch=5, epochs=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MAPPO, "_preprocess_batch", recorded)
        trained = {a: train(_config(None, None, route3_tasks, root / a, algorithm=a, **small)) for a in ("ppo", "mappo")}
    return trained, shapes


@pytest.mark.parametrize("algorithm", ["ppo", "mappo"])
def test_agents_for_three_members_learn_which_member_each_input_needs(trained_three, run_route3, three_members, algorithm):
    trained, shapes = trained_three
    history = json.loads((trained[algorithm] / "validation.json").read_text())
    assert max(e["validation"]["mean"] for e in history["epochs"]) > history["baselines"]["uniform"]["mean"] + 0.15, history
    members = f"members=[{','.join(three_members)}]"
    uniform = _harness(run_route3, members)
    agent = _harness(run_route3, f"{members},agent={trained[algorithm] / 'best'}")
    for task in ("route_mc", "route_gen"):  # on the test documents, through the harness
        assert agent[task] >= uniform[task] + 0.15, (algorithm, task, agent, uniform)
    spec, actor = load_agent(str(trained[algorithm] / "best"))
    assert spec.members == three_members and len(set(spec.vocab_fingerprints)) == 3
    assert [name for name, _ in spec.layout.segments] == ["hidden.0", "hidden.1", "hidden.2", "stats.0", "stats.1", "stats.2", "shared"]
    alpha, _ = actor(torch.randn(5, spec.layout.size))
    assert alpha.shape == (5, 3) and (alpha > 0).all()  # a Dirichlet over three weights (MAPPO: three Gammas)
    if algorithm == "mappo":  # one actor and one clipped ratio per member: old log-probs [B, 3], not a joint [B]
        assert len(actor.heads) == 3 and shapes and all(len(shape) == 2 and shape[1] == 3 for shape in shapes), shapes


@pytest.fixture(scope="module")
def run_route3(route3_tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=route3_tasks, include_defaults=False)
    return lambda model, model_args: lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["route_mc", "route_gen"], task_manager=manager, batch_size=16
    )["results"]


def test_an_agent_for_two_members_given_three_and_one_for_three_given_two_are_refused(trained, trained_three, three_members):
    with pytest.raises(AgentCheckpointError, match=r"trained for 2 members, members=\[.*\], not 3: .*train an agent for these 3 members"):
        AgentPolicy.load(str(trained["ppo"] / "best"), three_members)
    with pytest.raises(AgentCheckpointError, match=r"trained for 3 members, members=\[.*\], not 2"):
        AgentPolicy.load(str(trained_three[0]["mappo"] / "best"), three_members[:2])
    from lm_eval_rlae.lm import RLAELM

    with pytest.raises(AgentCheckpointError, match="trained for 2 members"):  # before any model loads
        RLAELM(members=f"[{','.join(three_members)}]", agent=str(trained["mappo"] / "best"), device="cpu")


def test_config_flags_override_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("members: [a, b]\ntasks: {t: 1.0}\nlr: 0.01\n")
    config = load_config(path, {"lr": 0.5, "hidden": [32], "algorithm": "mappo"})
    assert (config.lr, config.hidden, config.algorithm, config.out) == (0.5, [32], "mappo", str(Path("runs") / "c-mappo"))
    parser = argparse.ArgumentParser()
    dataclass_config.add_flags(parser, TrainConfig)
    assert config.speculative is None  # auto: drafts where rounds measure faster
    assert load_config(path, vars(parser.parse_args(["--speculative", "true"]))).speculative is True
    assert load_config(path, vars(parser.parse_args(["--speculative", "false"]))).speculative is False
    with pytest.raises(SystemExit):  # argparse: "'maybe': give true or false"
        parser.parse_args(["--speculative", "maybe"])
    with pytest.raises(SystemExit, match="unknown config keys"):
        load_config(path, {"learning_rate": 1})


# ----------------------------------------------------------------------------- leave-tasks-out


def test_held_out_tasks_are_never_trained_on_nor_selected_on(tmp_path, bpe_member, sp_member, route_tasks, monkeypatch):
    """A held-out task is never drawn by the training env, never validated on (so it picks no epoch) and
    is named in the checkpoint as held out; its test split is still read, for the table."""
    from trainer.agents.env import EnsembleEnv
    from trainer.agents.run import Run

    seen = []
    reset = EnsembleEnv.reset

    def recording_reset(self, env_id=None, documents=None, **kwargs):
        out = reset(self, env_id, documents, **kwargs)
        seen.extend(self.episodes[row].document.task.name for row in (range(self.n_rows) if env_id is None else np.atleast_1d(env_id)))
        return out

    monkeypatch.setattr(EnsembleEnv, "reset", recording_reset)
    config = _config(bpe_member, sp_member, route_tasks, tmp_path / "run", holdout=["route_gen"], rows=8, updates_per_epoch=2, epochs=1, val_docs=8)
    out = train(config)
    assert seen and set(seen) == {"route_mc"}
    history = json.loads((out / "validation.json").read_text())
    assert set(history["epochs"][0]["validation"]) == set(history["baselines"]["uniform"]) == {"route_mc", "mean"}
    spec, _ = load_agent(str(out / "best"))
    assert (list(spec.training["tasks"]), spec.training["held_out"]) == (["route_mc"], ["route_gen"])
    test = Run(dataclasses.replace(config, test_docs=4), splits=("test",))
    assert list(test.tasks["test"]) == ["route_mc", "route_gen"]


def test_best_fixed_weights_are_chosen_on_the_tasks_trained_on_alone():
    from trainer.agents.fixed_weights import best_on

    search = {"tasks": ["a", "b"], "points": [
        {"weights": [1.0, 0.0], "validation": {"a": 0.9, "b": 0.0, "mean": 0.45}},
        {"weights": [0.5, 0.5], "validation": {"a": 0.5, "b": 0.5, "mean": 0.50}},
        {"weights": [0.0, 1.0], "validation": {"a": 0.1, "b": 0.8, "mean": 0.45}},
    ]}
    assert best_on(search, ["a", "b"]) == [0.5, 0.5]
    assert best_on(search, ["a"]) == [1.0, 0.0]
    assert best_on(search, ["b"]) == [0.0, 1.0]
    with pytest.raises(SystemExit, match="no validation scores of"):
        best_on(search, ["a", "c"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(holdout=["nope"]), "not in tasks"),
        (dict(folds=[["route_mc"], ["route_mc", "route_gen"]]), "share tasks"),
        (dict(folds=[["route_mc"]], fold=1), "choose 0..0"),
        (dict(holdout=["route_mc", "route_gen"]), "nothing is left to train on"),
    ],
)
def test_bad_holdout_or_folds_are_refused(tmp_path, bpe_member, sp_member, route_tasks, fields, message):
    with pytest.raises(SystemExit, match=message):
        _config(bpe_member, sp_member, route_tasks, tmp_path / "run", **fields)


def test_rlae_folds_scores_every_task_with_the_agents_that_never_saw_it(tmp_path, bpe_member, sp_member, route_tasks, monkeypatch):
    """Two folds over the two route tasks: each fold's agent trains on the other task alone, its fixed
    weights are the search's best on the other task's validation, and the pooled table holds each task
    once, from its own fold."""
    import yaml

    from trainer.agents import folds
    from trainer.agents.fixed_weights import best_on, search
    from trainer.agents.run import Run

    small = dict(rows=8, updates_per_epoch=1, epochs=1, val_docs=8, test_docs=6, folds=[["route_mc"], ["route_gen"]])
    config = _config(bpe_member, sp_member, route_tasks, tmp_path / "unused", **small)
    fixed = tmp_path / "best_fixed.json"
    fixed.write_text(json.dumps(search(Run(config, splits=("validation",)), 0.5)))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "fold")}))
    evaluated, real = [], folds.method_scores
    monkeypatch.setattr(folds, "method_scores", lambda run, fixed, agents, reuse: evaluated.append((list(run.tasks["test"]), fixed, agents))
                        or real(run, fixed, agents, reuse=reuse))
    assert folds.main(["--config", str(path), "--algorithms", "ppo", "--test_docs", "6", "--fixed", str(fixed),
                       "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "table.json").read_text())
    assert sorted(result["tasks"]) == ["route_gen", "route_mc"]
    search_result = json.loads(fixed.read_text())
    for k, (tasks, weights, agents) in enumerate(evaluated):
        held_out = small["folds"][k]
        assert tasks == held_out
        assert weights == best_on(search_result, [t for t in ("route_mc", "route_gen") if t not in held_out])
        spec, _ = load_agent(agents["RLAE_PPO"])
        assert list(spec.training["tasks"]) == [t for t in ("route_mc", "route_gen") if t not in held_out]
    assert [row["tasks"] for row in result["folds"]] == small["folds"]
    assert (tmp_path / "out" / "transfer.png").is_file()


def test_stats_state_reads_each_members_confidence_over_a_questions_choices(bpe_member, sp_member):
    """`stats`: per member, the confidence of its next token, then of its softmax over the question's
    choices (here from each member's own loglikelihoods, read through one-hot weights), and whether the
    members prefer the same choice; a context scored with one continuation has no choices (zeros). The
    `members` kind keeps the layout the shipped agents were trained with."""
    from lm_eval_rlae.engine.fusion import FusionEngine
    from lm_eval_rlae.engine.members import Member, MemberSpec
    from lm_eval_rlae.policies import FixedPolicy
    from lm_eval_rlae.policies.state import make_state_features

    members = [Member(MemberSpec.parse(path, {"device": "cpu"})) for path in (bpe_member, sp_member)]
    requests = [("Q: what is 2+2? A:", " 4"), ("Q: what is 2+2? A:", " five"), ("Q: what is 2+2? A:", " 22"), ("Say", " hi")]
    engine = FusionEngine(members, FixedPolicy([1.0, 0.0]))
    features = make_state_features("stats", members, engine.union)
    assert features.layout.segments == (("stats.0", 6), ("stats.1", 6), ("shared", 6))
    assert [size for name, size in make_state_features("members", members, engine.union).layout.segments if not name.startswith("hidden")] == [3, 3, 4]

    state = features(engine.decision_state(engine.score(requests), requests))  # [4, 18]
    preferred = []
    for m in range(2):
        engine.use(FixedPolicy([float(m == 0), float(m == 1)]))
        totals = torch.tensor([logprob for logprob, _ in engine.loglikelihood(requests[:3])], dtype=torch.float64)
        probs = totals.softmax(-1).float()
        top = probs.sort(descending=True).values
        want = torch.stack([-(probs * probs.log()).sum() / np.log(3), top[0], top[0] - top[1]])
        for row in range(3):  # each choice's row carries its question's state
            torch.testing.assert_close(state[row, 6 * m + 3 : 6 * m + 6], want, atol=1e-4, rtol=1e-4)
        assert state[3, 6 * m + 3 : 6 * m + 6].abs().sum() == 0
        preferred.append(int(totals.argmax()))
    assert state[:3, 12 + 4].tolist() == [float(preferred[0] == preferred[1])] * 3
    assert state[:, 12 + 5].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_the_env_decodes_generation_speculatively_and_the_agent_reads_the_state_where_it_would_step_by_step(tmp_path, bpe_member, sp_member, route_tasks, monkeypatch):
    """The training env's generation rows are drafted and verified (the engine's default), drafts end
    at every span's end, so the agent's state is read after the same tokens with the same members'
    distributions (to float rounding between forwards over one token and over several), and every
    episode ends with the text of step-by-step decoding."""
    from lm_eval_rlae.engine.fusion import Generation
    from lm_eval_rlae.engine.speculative import Counts, Drafting
    from trainer.agents.run import Run
    from trainer.agents.tasks import Document

    monkeypatch.setattr(Drafting, "speculates", lambda self, batch: True)  # rounds, not the faster of rounds and steps
    run = Run(_config(bpe_member, sp_member, route_tasks, tmp_path / "run", tasks={"route_gen": 1.0}, rows=8, val_docs=4, speculative=True))
    assert run.engine.speculative
    span, state, reward = run.config.span_length, Generation.state, Document.reward
    ended = []  # (document, text) of every episode, in order

    def at_span_ends(generation):
        assert all(row.done or row.steps == generation.spans * span for row in generation.rows), "a draft crossed a span's end"
        return state(generation)

    def rewarded(document, responses):
        ended.append((document.key, responses))
        return reward(document, responses)

    monkeypatch.setattr(Generation, "state", at_span_ends)
    monkeypatch.setattr(Document, "reward", rewarded)
    documents = run.sampler_state()
    seen = {}
    for speculative in (False, True):
        run.engine.speculative, run.engine.drafting.counts = speculative, Counts()
        run.load_sampler_state(documents)
        rng = np.random.default_rng(0)
        observations = [run.env.reset()[0]]
        for _ in range(6):
            obs, _, done, _, _ = run.env.step(rng.dirichlet(np.ones(2), size=8))
            observations.append(obs)
            run.env.reset(np.flatnonzero(done))
        seen[speculative] = (np.stack(observations), list(ended), run.engine.drafting.counts)
        ended.clear()
    assert seen[True][2].rounds > 0 and seen[False][2].rounds == 0
    assert len(seen[False][1]) >= 8 and seen[True][1] == seen[False][1]
    np.testing.assert_allclose(seen[True][0], seen[False][0], atol=1e-4, rtol=1e-4)


def test_env_speed_times_the_env_both_ways_on_the_generation_tasks(tmp_path, bpe_member, sp_member, route_tasks, capsys):
    from trainer.agents.env_speed import main

    main(["--members", f"[{bpe_member}, {sp_member}]", "--tasks", "{route_mc: 1.0, route_gen: 1.0}", "--include_path", route_tasks,
          "--rows", "4", "--mc_rows", "16", "--span_length", "2", "--steps", "3", "--cache", str(tmp_path / "scores"), "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "4 rows of generation documents from 1 tasks" in out
    assert re.search(r"^env generation steps per second, step by step: \d+\.\d\d$", out, flags=re.M)
    assert re.search(r"^env generation steps per second, speculative: \d+\.\d\d \(\d+\.\d\dx\), acceptance [01]\.\d\d, "
                     r"tokens per verify pass \d+\.\d\d \(\d+ verify passes, \d+ plain steps\), \d+ episodes ended, same rewards$", out, flags=re.M)
    assert not (tmp_path / "scores").exists() or not any((tmp_path / "scores").rglob("*.safetensors")), "multiple-choice documents were scored"

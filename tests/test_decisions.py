"""Decisions a user can audit: with `--log_samples`, the weights an agent (or `weights=perplexity`)
chose for every request are written beside the harness's samples, keyed by the samples' doc_id and
the request's index; they are what the policy gives that document run alone; rlae-compare's weight
plots read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_eval_rlae.decisions import DecisionLog, read_decisions

SPAN_LENGTH = 2


@pytest.fixture(scope="module")
def untrained_agent(tmp_path_factory, bpe_member, sp_member) -> Path:
    """An RLAE_PPO checkpoint for [bpe, sp] with a seeded random actor, its last layer scaled up so
    that its weights vary clearly from state to state (a trained agent takes minutes to make)."""
    from lm_eval_rlae.lm import RLAELM
    from lm_eval_rlae.policies.agent import AgentSpec, save_agent
    from lm_eval_rlae.policies.state import make_state_features

    lm = RLAELM(members=[bpe_member, sp_member], device="cpu")
    features = make_state_features("members", lm.members, lm.engine.union)
    spec = AgentSpec(algorithm="ppo", members=[bpe_member, sp_member], vocab_fingerprints=[m.vocab.fingerprint for m in lm.members],
                     state="members", layout=features.layout, span_length=SPAN_LENGTH)
    torch.manual_seed(0)
    actor = spec.build_actor()
    with torch.no_grad():
        actor.head[-1].weight.mul_(30)
    out = tmp_path_factory.mktemp("agent") / "untrained"
    save_agent(out, spec, actor)
    return out


def _lm_eval(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(Path(sys.executable).parent / "lm_eval"), *args], capture_output=True, text=True, env=env, timeout=600)


def _jsonl(directory: Path, prefix: str, task: str) -> tuple[Path, list[dict]]:
    (path,) = directory.rglob(f"{prefix}_{task}_*.jsonl")
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def test_command_line_writes_every_decision_beside_the_samples(tmp_path, device, bpe_member, sp_member, untrained_agent, tiny_tasks_dir):
    """`lm_eval run ... agent=... --log_samples`: one line per request, keyed by the samples' doc_id and
    the request's index; each generation's spans and each choice's decision are what the agent gives
    that document run alone (here batched by 4, so rows that end early must not take later spans)."""
    from lm_eval.api.registry import get_model

    from lm_eval_rlae.compare.report import per_document, weight_plots
    from lm_eval_rlae.engine.fusion import Decoding, Generation

    members = f"[{bpe_member},{sp_member}]"
    run = _lm_eval(["run", "--model", "rlae", "--model_args", f"members={members},agent={untrained_agent}", "--tasks", "tiny_gen,tiny_mc",
                    "--include_path", tiny_tasks_dir, "--device", device, "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path)])
    assert run.returncode == 0, run.stderr[-4000:]

    alone = get_model("rlae")(members=members, agent=str(untrained_agent), device=device)
    engine = alone.engine
    spans_seen = set()
    for task in ("tiny_gen", "tiny_mc"):
        samples_path, samples = _jsonl(tmp_path, "samples", task)
        decisions_path, lines = _jsonl(tmp_path, "decisions", task)
        assert decisions_path.parent == samples_path.parent and decisions_path.name.removeprefix("decisions") == samples_path.name.removeprefix("samples")
        requests = {(s["doc_id"], i): args for s in samples for i, args in enumerate(s["arguments"].values())}
        assert [(line["doc_id"], line["idx"]) for line in lines] == sorted(requests)  # one line per request, in order
        for line in lines:
            assert line["members"] == [bpe_member, sp_member] and line["repeat"] == 0
            args = requests[(line["doc_id"], line["idx"])]
            if task == "tiny_gen":
                assert line["request_type"] == "generate_until"
                generation = Generation(engine, [args["arg_0"]], Decoding.from_gen_kwargs(args["arg_1"], alone.max_gen_toks))
                want = []
                while not generation.done:
                    weights = engine.policy(generation.state())
                    want.append(weights[0].tolist())
                    generation.advance(weights, engine.span_length)
                got = line["spans"]
                spans_seen.add(len(got))
            else:
                assert line["request_type"] == "loglikelihood"
                request = [(args["arg_0"], args["arg_1"])]
                want = engine.policy(engine.decision_state(engine.score(request), [args["arg_0"]])).tolist()
                got = [line["weights"]]
            assert len(got) == len(want), (task, line["doc_id"], got, want)
            np.testing.assert_allclose(got, want, atol=1e-4)
            np.testing.assert_allclose(np.sum(got, axis=1), 1, atol=1e-5)
    assert len(spans_seen) > 1  # generations of different lengths shared a batch
    every_weight = [w for task in ("tiny_gen", "tiny_mc") for line in _jsonl(tmp_path, "decisions", task)[1] for w in line.get("spans", [line.get("weights")])]
    assert np.ptp(np.array(every_weight)[:, 0]) > 0.1  # the agent's weights do depend on the state

    # rlae-compare's weight plots read these files
    read = {task: per_document(read_decisions(tmp_path, task)) for task in ("tiny_gen", "tiny_mc")}
    gen_lines = _jsonl(tmp_path, "decisions", "tiny_gen")[1]
    assert read["tiny_gen"] == {str(line["doc_id"]): dict(enumerate(line["spans"])) for line in gen_lines}
    assert set(read["tiny_mc"]) == {str(s["doc_id"]) for s in _jsonl(tmp_path, "samples", "tiny_mc")[1]}
    (plot,) = weight_plots({"agent": read}, [bpe_member, sp_member], tmp_path)
    assert plot.name == "weights_agent.png" and plot.stat().st_size > 10_000


def test_simple_evaluate_with_a_tracker_writes_them_and_only_for_policies_that_read_the_state(tmp_path, bpe_member, sp_member, tiny_task_manager):
    """The Python route (`simple_evaluate` with an EvaluationTracker, then the tracker's save calls):
    perplexity weights are written; uniform weights are not (the same for every request, and in the
    model arguments); a later `hf` run in the same process gets no decisions of the earlier run."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    def evaluate(model, model_args, out):
        tracker = EvaluationTracker(output_path=str(out))
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"], task_manager=tiny_task_manager,
                                          log_samples=True, evaluation_tracker=tracker, limit=3, batch_size=2, device="cpu")
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        tracker.save_results_samples(task_name="tiny_mc", samples=samples["tiny_mc"])
        return sorted(path.name.split("_")[0] for path in out.rglob("*.jsonl"))

    members = f"members=[{bpe_member},{sp_member}]"
    assert evaluate("rlae", f"{members},weights=perplexity", tmp_path / "perplexity") == ["decisions", "samples"]
    lines = read_decisions(tmp_path / "perplexity", "tiny_mc")
    assert len(lines) > 3 and {line["doc_id"] for line in lines} == {0, 1, 2}
    assert evaluate("rlae", f"{members},weights=uniform", tmp_path / "uniform") == ["samples"]
    assert evaluate("hf", f"pretrained={bpe_member}", tmp_path / "hf") == ["samples"]


class _Request:
    def __init__(self, doc_id, idx, request_type="loglikelihood", task_name="t"):
        self.doc_id, self.idx, self.request_type, self.task_name = doc_id, idx, request_type, task_name


def test_log_keeps_the_latest_run_of_each_request_and_counts_repeats():
    log = DecisionLog()
    a, b = _Request(0, 0), _Request(0, 1)
    log.start([a, b])
    for request in (a, b, a):  # a task with repeats sends a request twice in one call
        log.add(request, ["x", "y"], np.array([[0.25, 0.75]]))
    assert [(line["idx"], line["repeat"]) for line in log.lines("t")] == [(0, 0), (0, 1), (1, 0)]
    log.start([a])  # the next evaluation's call of the same request type forgets the last one's
    log.add(a, ["x", "y"], np.array([[0.5, 0.5]]))
    assert log.lines("t") == [{"doc_id": 0, "idx": 0, "request_type": "loglikelihood", "repeat": 0, "members": ["x", "y"], "weights": [0.5, 0.5]}]
    log.add(_Request(1, 0, task_name=None), ["x", "y"], np.array([[0.5, 0.5]]))  # not from a task: nowhere to write it
    assert set(log.records) == {"t"}

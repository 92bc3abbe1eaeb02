"""`rlae-agent-table`: the learned agents against everything they must beat, on the same test documents.

    rlae-agent-table --config trainer/configs/specialists.yaml [--test_docs 100]
                     [--fixed runs/specialists-fixed/best_fixed.json]
                     [--agents RLAE_PPO=rlae-ppo-specialists,RLAE_MAPPO=rlae-mappo-specialists] [--output results/agents]
                     [--tasks a,b,...]   # other harness tasks than the config's, e.g. ones the agents never saw

Methods: each member alone (one-hot weights: the engine equals `--model hf` there, tests/test_equality_hf.py),
uniform weights, the best fixed weights (chosen on validation by `rlae-best-fixed`) and each agent; per-task
oracle routing is read off the members alone (each task sent to the member that is better on it: an
upper bound no fixed rule reaches).

Every method runs over the first `test_docs` documents of each task's TEST split (as `lm_eval --limit`)
through the env the agents are trained and validated in: the harness task's own documents, few-shot
contexts and requests, its filters and `process_results` as the score, multiple-choice scores computed
once per member and mixed per method (so six methods cost one scoring pass, not six), generations decoded
live by the engine. That this is what `lm_eval --model rlae` reports, document by document, for fixed
weights and for an agent, is tests/test_agents.py::test_table_env_is_the_harness.

Each finished method is kept in `--output` (scores_<method>.json, keyed by the members, the method
exactly, the split and the documents) and reused: a killed table, or one with a new agent, costs only
what is new.

Per task and overall (the mean over tasks): accuracy with n and a 95% interval, and the paired difference
of each agent to the best fixed weights and to uniform with its own 95% interval (a paired bootstrap over
the same documents, stratified by task). Writes `table.md`, `table.json` and `table.png`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import typing
from pathlib import Path

import numpy as np

from lm_eval_rlae.compare.report import accuracy_plot
from lm_eval_rlae.compare.stats import paired_interval, wilson
from lm_eval_rlae.files import read_json, write_text

AGENTS = {"RLAE_PPO": "rlae-ppo-specialists", "RLAE_MAPPO": "rlae-mappo-specialists"}


def methods(run, fixed: list[float] | None, agents: dict[str, str]) -> dict[str, tuple[str, typing.Callable]]:
    """label -> (what it is, exactly: the key a finished run is reused by; weights from obs)."""
    from lm_eval_rlae.policies.agent import AgentPolicy, agent_dir
    from trainer.agents.run import agent_weights, constant

    names = list(run.config.members)
    out = {f"{name} alone": (_weights(np.eye(len(names))[m]), constant(np.eye(len(names))[m])) for m, name in enumerate(names)}
    out["uniform"] = (_weights([1.0] * len(names)), constant([1.0] * len(names)))
    if fixed is not None:
        out["best fixed"] = (_weights(fixed), constant(fixed))
    for label, agent in agents.items():
        policy = AgentPolicy.load(agent, names)
        policy.features = run.features  # the env's state: bind refuses an agent laid out otherwise
        policy.bind(run.members, run.engine.union)  # the same checks as --model_args agent=
        digest = hashlib.sha256((agent_dir(agent) / "actor.safetensors").read_bytes()).hexdigest()[:16]
        out[label] = (f"agent with actor sha256 {digest}", agent_weights(policy.actor))  # wherever it lies
    return out


def _weights(weights) -> str:
    """Fixed weights as what they do (normalised), so equal weightings are one method."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return "weights=uniform" if np.allclose(w, w[0]) else f"weights={np.round(w, 6).tolist()}"


def method_scores(run, fixed: list[float] | None, agents: dict[str, str], split: str = "test", reuse: Path | None = None,
                  only: set[str] | None = None) -> tuple[dict, dict]:
    """{label: {task: {doc key: score}}} and {label: {"seconds", env "steps_per_s" per kind of task}}
    for every method on `split` (`only`: for these methods alone, so that processes can share the
    work). With `reuse`, each finished method is written there and read back instead of rerun while it
    is the same method on the same documents (a killed table, or one with a new agent, costs only what
    is new)."""
    documents = {t: [d.key for d in task.documents] for t, task in run.tasks[split].items()}
    scores, speed, done = {}, {}, {}  # done: definition -> the label that has its scores
    for label, (definition, act) in methods(run, fixed, agents).items():
        if only is not None and label not in only:
            continue
        if definition in done:  # e.g. best fixed = uniform: the same documents under the same weights
            scores[label], speed[label] = scores[done[definition]], speed[done[definition]]
            continue
        done[definition] = label
        key = {"members": list(run.config.members), "method": definition, "split": split, "documents": documents}
        path = reuse / f"scores_{label.replace(' ', '_')}.json" if reuse else None
        saved = read_json(path) if path else None
        if isinstance(saved, dict) and saved.get("key") == key:
            scores[label], speed[label] = saved["scores"], saved["speed"]
            print(f"{label}: reused {path}", flush=True)
            continue
        start, steps_per_s = time.perf_counter(), {}
        rewards = run.evaluate(split, act, steps_per_s)
        speed[label] = {"seconds": time.perf_counter() - start, "steps_per_s": steps_per_s}
        scores[label] = {t: dict(zip(documents[t], values)) for t, values in rewards.items()}
        print(f"{label}: {np.mean([np.mean(v) for v in rewards.values()]):.4f} ({speed[label]['seconds']:.0f} s)", flush=True)
        if path:
            write_text(path, json.dumps({"key": key, "scores": scores[label], "speed": speed[label]}) + "\n")
    return scores, speed


def table(scores: dict[str, dict], seed: int = 0) -> tuple[str, dict]:
    """Markdown and JSON of per-task accuracy (with 95% Wilson intervals), the overall mean, and each
    agent's paired difference to the best fixed weights."""
    rng = np.random.default_rng(seed)
    tasks = list(next(iter(scores.values())))
    alone = [label for label in scores if label.endswith(" alone")]
    scores = dict(scores)
    scores["oracle routing"] = {t: max((scores[m][t] for m in alone), key=lambda s: np.mean(list(s.values()))) for t in tasks}
    labels = list(scores)
    agents = [label for label in labels if label.startswith("RLAE_")]
    lines = [f"| task | n | {' | '.join(labels)} |", "|" + " --- |" * (2 + len(labels))]
    summary: dict = {"tasks": {}, "overall": {}, "paired": {}}
    for t in tasks:
        n = len(scores[labels[0]][t])
        cells = []
        for label in labels:
            p = float(np.mean(list(scores[label][t].values())))
            low, high = wilson(p, n)
            summary["tasks"].setdefault(t, {})[label] = {"acc": p, "n": n, "ci95": [low, high]}
            cells.append(f"{100 * p:.1f} [{100 * low:.0f}, {100 * high:.0f}]")
        lines.append(f"| {t} | {n} | {' | '.join(cells)} |")
    overall = []
    for label in labels:
        mean = float(np.mean([summary["tasks"][t][label]["acc"] for t in tasks]))
        zero = {t: {k: 0.0 for k in scores[label][t]} for t in tasks}
        _, low, high = paired_interval(scores[label], zero, rng)
        summary["overall"][label] = {"acc": mean, "ci95": [low, high]}
        overall.append(f"**{100 * mean:.1f}** [{100 * low:.1f}, {100 * high:.1f}]")
    lines.append(f"| **mean of {len(tasks)} tasks** | {sum(len(scores[labels[0]][t]) for t in tasks)} | {' | '.join(overall)} |")
    lines += ["", "| agent | vs best fixed (paired, points) | vs uniform | gap to oracle routing captured |", "| --- | --- | --- | --- |"]
    fixed, oracle = summary["overall"]["best fixed"]["acc"], summary["overall"]["oracle routing"]["acc"]
    for agent in agents:
        to_fixed = paired_interval(scores[agent], scores["best fixed"], rng)
        to_uniform = paired_interval(scores[agent], scores["uniform"], rng)
        captured = (summary["overall"][agent]["acc"] - fixed) / (oracle - fixed) if oracle > fixed else float("nan")
        summary["paired"][agent] = {"vs best fixed": to_fixed, "vs uniform": to_uniform, "gap captured": captured}
        lines.append(
            f"| {agent} | {100 * to_fixed[0]:+.1f} [{100 * to_fixed[1]:+.1f}, {100 * to_fixed[2]:+.1f}] | "
            f"{100 * to_uniform[0]:+.1f} [{100 * to_uniform[1]:+.1f}, {100 * to_uniform[2]:+.1f}] | {100 * captured:.0f}% |"
        )
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    from trainer.agents.run import Run, load_config

    parser = argparse.ArgumentParser(prog="rlae-agent-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("trainer/configs/specialists.yaml"), help="the agents' rlae-train config (members, tasks, state)")
    parser.add_argument("--tasks", default=None, help="a,b,...: harness tasks instead of the config's (e.g. tasks the agents never saw)")
    parser.add_argument("--test_docs", type=int, default=100, help="test documents per task (default %(default)s; all where fewer)")
    parser.add_argument("--fixed", type=Path, default=None, help="rlae-best-fixed's output (default runs/<config name>-fixed/best_fixed.json)")
    parser.add_argument("--agents", default=",".join(f"{k}={v}" for k, v in AGENTS.items()), help="LABEL=AGENT,... (directories or shipped names)")
    parser.add_argument("--output", type=Path, default=Path("results/agents"))
    args = parser.parse_args(argv)
    fixed_path = args.fixed or Path("runs") / f"{args.config.stem}-fixed" / "best_fixed.json"
    if not fixed_path.is_file():
        raise SystemExit(f"no {fixed_path}: run rlae-best-fixed --config {args.config} first, or pass --fixed")
    fixed = json.loads(fixed_path.read_text())["best"]["weights"]
    agents = dict(item.split("=", 1) for item in args.agents.split(",") if item)
    overrides = {"test_docs": args.test_docs, "tasks": {t: 1.0 for t in args.tasks.split(",")} if args.tasks else None}
    run = Run(load_config(args.config, overrides), splits=("test",))
    scores, speed = method_scores(run, fixed, agents, reuse=args.output)
    markdown, summary = table(scores)
    summary["members"] = list(run.config.members)
    summary["fixed weights"] = fixed
    summary["speed"] = speed
    markdown += (
        f"\n\nAccuracy (%) with 95% Wilson intervals, first {args.test_docs} test documents per task (all where fewer); "
        f"best fixed = weights={fixed} (chosen on validation); paired differences in points with 95% paired "
        f"bootstrap intervals over the same documents. Env steps per second (multiple choice from cached scores / live "
        f"generation), wall time: " + "; ".join(
            f"{label} {v['steps_per_s'].get('multiple_choice', 0):.0f} / {v['steps_per_s'].get('generate_until', 0):.1f}, {v['seconds']:.0f} s"
            for label, v in speed.items()) + ".\n"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text(markdown)
    (args.output / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    accuracy_plot(summary, args.output / "table.png", f"{' + '.join(summary['members'])}: members alone, fixed weightings, learned agents, oracle routing (test split)")
    print(markdown)
    print(f"written: {args.output / 'table.md'}, table.json, table.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rlae-folds`: leave-tasks-out. Does an agent carry what it learned to tasks it never saw?

    rlae-folds --config trainer/configs/specialists.yaml [--algorithms ppo,mappo] [--test_docs 100]
               [--fixed runs/specialists-fixed/best_fixed.json] [--output results/folds/specialists]
               [--calibrate 16]

The config's `folds` split its tasks into disjoint groups. For each fold k, an agent trains on every
task but folds[k] (`rlae-train --fold k`: the held-out tasks are never sampled, and the best epoch is
chosen on the other tasks' validation); the best fixed weights of fold k are the grid point of
`rlae-best-fixed`'s search (one search over every task's validation) that is best on the other tasks'
validation alone. Then fold k's held-out tasks are evaluated on their test split: each member alone,
uniform, fold k's best fixed weights, fold k's agents, and oracle routing (each task sent to the member
that is better on it, read off the members alone: what a per-task router would get if it knew).
With `--calibrate K`, also uniform and each agent as `calibrate=K` runs them (`lm_eval_rlae.calibration`):
per held-out task, the method or a member alone, chosen on K of its validation documents.

Each task is unseen in exactly one fold (where the folds cover the tasks), so the pooled table has every
task once, scored by agents that never saw it. Output: `table.md` (per task, per fold and pooled, with
paired 95% intervals of each agent against the best fixed weights and against routing), `table.json`,
`transfer.png`. Training runs resume and finished evaluations are reused, like the commands they call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from lm_eval_rlae.calibration import choose, sample
from lm_eval_rlae.compare.stats import paired_interval
from trainer.agents.agent_table import method_scores, table
from trainer.agents.fixed_weights import best_on
from trainer.agents.run import TrainConfig, load_config

LABELS = {"ppo": "RLAE_PPO", "mappo": "RLAE_MAPPO"}


def fold_config(config: TrainConfig, k: int, algorithm: str, root: Path) -> TrainConfig:
    """The training config of fold k: the same run with folds[k] held out, in its own directory."""
    return dataclasses.replace(config, fold=k, algorithm=algorithm, out=str(root / f"{algorithm}-fold{k}"))


def train_fold(config: TrainConfig) -> Path:
    """Train (or resume, or find finished) the agent of one fold; returns its `best/` checkpoint."""
    from trainer.agents.train import train

    out = Path(config.out)
    history = out / "validation.json"
    done = history.is_file() and len(json.loads(history.read_text())["epochs"]) >= config.epochs
    return (out if done else train(config)) / "best"


def evaluate_fold(config: TrainConfig, k: int, fixed: list[float], agents: dict[str, Path], reuse: Path, calibrate: int = 0) -> dict:
    """{method: {task: {doc: score}}} on the test split of fold k's held-out tasks. With `calibrate` K,
    also uniform and each agent as `calibrate=K` runs them: per task, the method or a member alone, chosen
    on K documents drawn as the runtime draws them, from the first `val_docs` of the task's validation."""
    from trainer.agents.run import Run

    held_out = config.folds[k]
    test = dataclasses.replace(config, tasks={t: config.tasks[t] for t in held_out}, holdout=[], folds=[], fold=None)
    run = Run(test, splits=("validation", "test") if calibrate else ("test",))
    agents = {label: str(path) for label, path in agents.items()}
    scores, _ = method_scores(run, fixed, agents, reuse=reuse)
    if calibrate:
        validation, _ = method_scores(run, fixed, agents, split="validation", reuse=reuse / "validation")
        scores |= calibrated(validation, scores, ["uniform", *agents], calibrate)
    return scores


def calibrated(validation: dict, test: dict, labels: list[str], documents: int) -> dict:
    """{"<label>, calibrated": {task: test scores}}: per task, the test scores of the candidate (the method
    `label` or a member alone) that `calibrate=documents` chooses at run time, from validation scores."""
    alone = [label for label in test if label.endswith(" alone")]
    out = {}
    for label in labels:
        out[f"{label}, calibrated"] = {}
        for task in test[label]:
            keys = list(validation[label][task])
            keys = [keys[i] for i in sample(len(keys), documents)]
            per_document = {candidate: [validation[candidate][task][key] for key in keys] for candidate in [label, *alone]}
            out[f"{label}, calibrated"][task] = test[choose(per_document, keep=label)][task]
    return out


def pooled(per_fold: list[dict], folds: list[list[str]], seed: int = 0) -> tuple[str, dict]:
    """The pooled table (every task once, from the fold that held it out) and per-fold rows."""
    rng = np.random.default_rng(seed)
    labels = list(per_fold[0])
    scores = {label: {t: fold[label][t] for fold in per_fold for t in fold[label]} for label in labels}
    markdown, summary = table(scores)
    agents = [label for label in labels if label.startswith("RLAE_")]
    alone = [label for label in labels if label.endswith(" alone")]
    lines = ["", "| fold | held-out tasks | n | best fixed | oracle routing | " + " | ".join(
        f"{a} | {a} - best fixed | {a} - routing" for a in agents) + " |", "|" + " --- |" * (5 + 3 * len(agents))]
    summary["folds"] = []
    for k, (fold, tasks) in enumerate(zip(per_fold, folds)):
        routing = {t: max((fold[m][t] for m in alone), key=lambda s: np.mean(list(s.values()))) for t in tasks}
        row = {"fold": k, "tasks": tasks, "best fixed": _mean(fold["best fixed"]), "oracle routing": _mean(routing), "agents": {}}
        cells = []
        for agent in agents:
            to_fixed = paired_interval(fold[agent], fold["best fixed"], rng)
            to_routing = paired_interval(fold[agent], routing, rng)
            row["agents"][agent] = {"acc": _mean(fold[agent]), "vs best fixed": to_fixed, "vs oracle routing": to_routing}
            cells += [f"{100 * _mean(fold[agent]):.1f}", _diff(to_fixed), _diff(to_routing)]
        n = sum(len(fold[labels[0]][t]) for t in tasks)
        lines.append(f"| {k} | {', '.join(t.removeprefix('bb_') for t in tasks)} | {n} | {100 * row['best fixed']:.1f} | "
                     f"{100 * row['oracle routing']:.1f} | " + " | ".join(cells) + " |")
        summary["folds"].append(row)
    return markdown + "\n" + "\n".join(lines), summary


def _mean(scores: dict) -> float:
    return float(np.mean([np.mean(list(docs.values())) for docs in scores.values()]))


def _diff(d) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def transfer_plot(summary: dict, path: Path, title: str) -> None:
    """Per fold and pooled: each agent minus the best fixed weights and minus oracle routing, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(summary["folds"][0]["agents"])
    names = [f"fold {row['fold']}\n" + "\n".join(t.removeprefix("bb_")[:22] for t in row["tasks"]) for row in summary["folds"]] + ["pooled"]
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 1.4 * len(names)), 5.5), sharey=True)
    for ax, base in zip(axes, ("best fixed", "oracle routing")):
        width = 0.8 / len(agents)
        for a, agent in enumerate(agents):
            diffs = [row["agents"][agent][f"vs {base}"] for row in summary["folds"]] + [summary["groups"]["all"]["paired"][agent][f"vs {base}"]]
            point = np.array([100 * d[0] for d in diffs])
            errors = np.array([[100 * (d[0] - d[1]) for d in diffs], [100 * (d[2] - d[0]) for d in diffs]])
            x = np.arange(len(names)) + a * width
            ax.bar(x, point, width, label=agent, color=f"C{a}")
            ax.errorbar(x, point, yerr=errors, fmt="none", ecolor="black", capsize=3, elinewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)  # a fold is named by the tasks it holds out
        ax.set_title(f"agent - {base} on held-out tasks (points, 95% paired interval)", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("accuracy difference (points)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(prog="rlae-folds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an rlae-train config with `folds`")
    parser.add_argument("--algorithms", default="ppo,mappo", help="agents to train per fold (default %(default)s)")
    parser.add_argument("--test_docs", type=int, default=100, help="test documents per held-out task (default %(default)s)")
    parser.add_argument("--fixed", type=Path, default=None, help="rlae-best-fixed's search over every task (default runs/<config name>-fixed/best_fixed.json)")
    parser.add_argument("--runs", type=Path, default=None, help="where the fold agents train (default runs/<config name>-folds)")
    parser.add_argument("--output", type=Path, default=None, help="default results/folds/<config name>")
    parser.add_argument("--calibrate", type=int, default=0, help="also uniform and each agent with calibrate=K: K validation documents per held-out task (default: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, {"test_docs": args.test_docs})
    if not config.folds:
        raise SystemExit(f"{args.config} has no `folds`: give disjoint groups of its tasks to hold out in turn")
    if uncovered := [t for t in config.tasks if not any(t in fold for fold in config.folds)]:
        print(f"note: {uncovered} are held out by no fold: the pooled table leaves them out", flush=True)
    fixed_path = args.fixed or Path("runs") / f"{args.config.stem}-fixed" / "best_fixed.json"
    if not fixed_path.is_file():
        raise SystemExit(f"no {fixed_path}: run rlae-best-fixed --config {args.config} first (one search over every task's validation)")
    search = json.loads(fixed_path.read_text())
    runs = args.runs or Path("runs") / f"{args.config.stem}-folds"
    output = args.output or Path("results") / "folds" / args.config.stem
    per_fold = []
    for k, held_out in enumerate(config.folds):
        fixed = best_on(search, [t for t in config.tasks if t not in held_out])
        print(f"fold {k}: holds out {held_out}; best fixed weights on the other tasks' validation: {fixed}", flush=True)
        agents = {LABELS[a]: train_fold(fold_config(config, k, a, runs)) for a in args.algorithms.split(",")}
        per_fold.append(evaluate_fold(config, k, fixed, agents, output / f"fold{k}", args.calibrate))
    markdown, summary = pooled(per_fold, config.folds)
    summary |= {"members": list(config.members), "config": str(args.config)}
    markdown += (
        f"\n\nHeld-out tasks only, first {args.test_docs} test documents each: every task is scored by the agents of the "
        "fold that never trained on it, beside that fold's best fixed weights (chosen on the other tasks' validation) and "
        "oracle routing (each task's better member, read off the members alone). Accuracy (%) with 95% intervals; paired "
        "differences in points with 95% paired bootstrap intervals over the same documents.\n"
    )
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(markdown)
    (output / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    transfer_plot(summary, output / "transfer.png", f"{' + '.join(config.members)}: leave-tasks-out ({len(config.folds)} folds)")
    print(markdown)
    print(f"written: {output / 'table.md'}, table.json, transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rlae-agent-table`: the learned agents against everything they must beat, on the same test documents,
through the harness.

    rlae-agent-table [--limit 100] [--fixed runs/specialists-fixed/best_fixed.json]
                     [--agents ppo=rlae-ppo-specialists,mappo=rlae-mappo-specialists] [--output results/agents]

Runs (each through `lm_eval run ... --log_samples`, reused when already in `--output`): each member
alone (`--model hf`), `rlae` with uniform weights, with the best fixed weights (chosen on validation
by `rlae-best-fixed`), and with each agent; per-task oracle routing is read off the members' runs
(each task sent to the member that is better on it: an upper bound no fixed rule reaches).

Per task and overall (the mean over tasks): accuracy with n and a 95% interval, and the paired
difference of each agent to the best fixed weights with its own 95% interval (a paired bootstrap
over the same documents, stratified by task). Writes `table.md`, `table.json` and `table.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from lm_eval_rlae.demo import _run, wilson
from trainer.specialists import SPECIALISTS

TASKS = [task for config in SPECIALISTS.values() for task in config.tasks]
MEMBERS = list(SPECIALISTS)
AGENTS = {"RLAE_PPO": "rlae-ppo-specialists", "RLAE_MAPPO": "rlae-mappo-specialists"}
BOOTSTRAP = 2000


def runs(members: list[str], fixed: list[float], agents: dict[str, str]) -> dict[str, list[str]]:
    """label -> `lm_eval run` model arguments."""
    from lm_eval_rlae.offline.presets import hf_model_args

    ensemble = f"members=[{','.join(members)}]"
    out = {f"{name} alone": ["--model", "hf", "--model_args", hf_model_args(name)] for name in members}
    out["uniform"] = ["--model", "rlae", "--model_args", f"{ensemble},weights=uniform"]
    out["best fixed"] = ["--model", "rlae", "--model_args", f"{ensemble},weights=[{','.join(f'{w:g}' for w in fixed)}]"]
    out |= {label: ["--model", "rlae", "--model_args", f"{ensemble},agent={agent}"] for label, agent in agents.items()}
    return out


def per_document(out_dir: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {doc key: the task's primary metric}} from a run's logged samples."""
    scores = {}
    for task in tasks:
        files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise SystemExit(f"no logged samples of {task} under {out_dir}: rerun without reuse")
        rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
        metric = "acc" if "acc" in rows[0] else "exact_match"
        scores[task] = {str(row["doc"].get("doc_hash", row["doc_id"])): float(row[metric]) for row in rows}
    return scores


def paired_interval(a: dict, b: dict, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean over tasks of a - b, with a 95% paired bootstrap interval (documents resampled within tasks)."""
    diffs = [np.array([a[t][k] - b[t][k] for k in a[t]]) for t in a]
    point = float(np.mean([d.mean() for d in diffs]))
    draws = np.mean([d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(1) for d in diffs], axis=0)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


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


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    labels = list(summary["overall"])
    fig, (ax, ax_mean) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [5, 1]})
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        accs = np.array([summary["tasks"][t][label]["acc"] for t in tasks])
        cis = np.array([summary["tasks"][t][label]["ci95"] for t in tasks])
        x = np.arange(len(tasks)) + k * width
        ax.bar(x, 100 * accs, width, label=label)
        ax.errorbar(x, 100 * accs, yerr=100 * np.abs(cis.T - accs), fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
        o = summary["overall"][label]
        ax_mean.bar(k, 100 * o["acc"], 0.8, color=f"C{k}")
        ax_mean.errorbar(k, 100 * o["acc"], yerr=[[100 * (o["acc"] - o["ci95"][0])], [100 * (o["ci95"][1] - o["acc"])]], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([t.removeprefix("bb_") for t in tasks], rotation=55, ha="right", fontsize=8)
    ax.set_ylabel("accuracy on the test split (%), 95% interval")
    ax.set_title("Specialist pair: members alone, fixed weightings, learned agents, oracle routing")
    ax.legend(fontsize=8, ncol=2)
    ax_mean.set_xticks(range(len(labels)))
    ax_mean.set_xticklabels(labels, rotation=55, ha="right", fontsize=8)
    ax_mean.set_title(f"mean of {len(tasks)} tasks")
    lows = [o["ci95"][0] for o in summary["overall"].values()]
    ax_mean.set_ylim(max(0, 100 * min(lows) - 5), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlae-agent-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="test documents per task (default %(default)s; all where fewer)")
    parser.add_argument("--fixed", type=Path, default=Path("runs/specialists-fixed/best_fixed.json"), help="rlae-best-fixed's output")
    parser.add_argument("--agents", default=",".join(f"{k}={v}" for k, v in AGENTS.items()), help="LABEL=AGENT,... (directories or shipped names)")
    parser.add_argument("--output", type=Path, default=Path("results/agents"))
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval_rlae.offline.data import TASK_CONFIGS

    fixed = json.loads(args.fixed.read_text())["best"]["weights"]
    agents = dict(item.split("=", 1) for item in args.agents.split(",") if item)
    common = ["--include_path", str(TASK_CONFIGS), "--tasks", ",".join(TASKS), "--limit", str(args.limit),
              "--batch_size", str(args.batch_size), "--log_samples"]
    scores, seconds = {}, {}
    args.output.mkdir(parents=True, exist_ok=True)
    for label, model_args in runs(MEMBERS, fixed, agents).items():
        out = args.output / label.replace(" ", "_")
        if not any(out.rglob("results_*.json")):
            print(f"\n--- {label}", flush=True)
            seconds[label] = _run([sys.executable, "-m", "lm_eval", "run", *model_args, *common, "--output_path", str(out)], args.output / f"{label.replace(' ', '_')}.log")
        scores[label] = per_document(out, TASKS)
    markdown, summary = table(scores)
    summary["fixed weights"] = fixed
    summary["seconds"] = seconds
    markdown += (
        f"\n\nAccuracy (%) with 95% Wilson intervals, first {args.limit} test documents per task (all where fewer); "
        f"best fixed = weights={fixed} (chosen on validation); paired differences in points with 95% paired "
        f"bootstrap intervals over the same documents.\n"
    )
    (args.output / "table.md").write_text(markdown)
    (args.output / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.output / "table.png")
    print(markdown)
    print(f"written: {args.output / 'table.md'}, table.json, table.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

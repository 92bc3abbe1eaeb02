"""The specialists' table: on the test splits of both skill sets, each specialist alone (`--model hf`
with its adapter), the two ensembled with uniform weights (`--model rlae`), and the per-task oracle
routing (each task sent to its better specialist): the headroom a learned weighting can capture.

    rlae-specialist-table [--limit 80] [--output results/specialists] [--split test]

Writes `table.md` (the table below, per task and per skill set) and `table.png` (the same as bars)
into the output directory, with the harness's own results and logs of every run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lm_eval_rlae.compare.stats import wilson
from lm_eval_rlae.demo import compare
from trainer.specialists.build import SPECIALISTS

PRIMARY_METRICS = ("acc,none", "exact_match,numeric")  # multiple choice; numeric generation
TASKS = [task for config in SPECIALISTS.values() for task in config.tasks]  # both skill sets, in table order


def primary(rows: dict, task: str) -> tuple[float, int] | None:
    for metric in PRIMARY_METRICS:
        if (task, metric) in rows:
            return rows[(task, metric)]
    return None


def table(results: dict, limit: int, split: str = "test") -> tuple[str, dict]:
    """Markdown of per-task accuracies (and skill-set means); also returns {column: {task: acc}}."""
    names = list(SPECIALISTS)
    columns = {f"{name} alone": results[f"hf {name}"] for name in names} | {"uniform ensemble": results["rlae uniform"]}
    scores: dict[str, dict[str, float]] = {col: {} for col in [*columns, "oracle routing"]}
    lines = [
        f"| skill set | task | n | {' | '.join(scores)} |",
        "|" + " --- |" * (3 + len(scores)),
    ]

    def mean_row(label: str, tasks) -> str:
        means = [sum(scores[col][t] for t in tasks) / len(tasks) for col in scores]
        return f"| **{label}** | **mean of {len(tasks)} tasks** | | {' | '.join(f'**{100 * m:.1f}**' for m in means)} |"

    for owner in names:
        tasks = SPECIALISTS[owner].tasks
        for task in tasks:
            cells, n = [], 0
            for col, rows in columns.items():
                value, n = primary(rows, task)
                scores[col][task] = value
                cells.append(f"{100 * value:.1f}")
            scores["oracle routing"][task] = max(scores[f"{name} alone"][task] for name in names)
            cells.append(f"{100 * scores['oracle routing'][task]:.1f}")
            lines.append(f"| {owner} | {task} | {n} | {' | '.join(cells)} |")
        lines.append(mean_row(owner, tasks))
    lines.append(mean_row("both", TASKS))
    low, high = wilson(0.5, limit)
    half = 100 * (high - low) / 2
    lines.append("")
    lines.append(
        f"Accuracy (%) on the first {limit} {split} documents of each task (fewer where the split is smaller); "
        f"multiple choice: `acc`, generation: `exact_match` of the first number. A single task's 95% interval is "
        f"up to +/-{half:.0f} points at n={limit}; the skill-set means are much tighter."
    )
    return "\n".join(lines), scores


def plot(scores: dict, path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(10, 0.7 * len(TASKS)), 4.5))
    width = 0.8 / len(scores)
    for k, (col, values) in enumerate(scores.items()):
        ax.bar([i + k * width for i in range(len(TASKS))], [100 * values[t] for t in TASKS], width, label=col)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(TASKS))])
    ax.set_xticklabels([t.removeprefix("bb_") for t in TASKS], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"accuracy on the {split} split (%)")
    ax.set_title("Specialists alone, uniform ensemble and per-task oracle routing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlae-specialist-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=80, help="documents per task (default %(default)s)")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="the split evaluated (default %(default)s; validation: for choosing, keeping test unseen)")
    parser.add_argument("--output", type=Path, default=Path("results/specialists"))
    parser.add_argument("--reuse", action="store_true", help="read runs already in --output instead of running them again")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    results, seconds = compare(
        list(SPECIALISTS), ",".join(TASKS), args.limit, args.output, reuse=args.reuse, split=args.split
    )
    markdown, scores = table(results, args.limit, args.split)
    timed = [f"{label} {s:.0f} s" for label, s in seconds.items() if s == s]  # reused runs: NaN
    markdown += "\n" + (f"Wall time: {', '.join(timed)}.\n" if timed else "")
    (args.output / "table.md").write_text(markdown)
    plot(scores, args.output / "table.png", args.split)
    print(markdown)
    print(f"written: {args.output / 'table.md'}, {args.output / 'table.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

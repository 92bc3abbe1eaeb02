"""What `rlae-compare` writes: the table (Markdown and JSON) and the plots.

Per task and overall (the mean over tasks, each task counting once): accuracy with n and a 95%
interval; the paired difference of every method to the best single member, to uniform and to the
best fixed weights (paired bootstrap over the same documents); what each method cost. Plots: accuracy
with intervals per method and task; an agent's weights over the spans of sample documents; the
distribution of an agent's weights per task. The weights are read from the decisions files the
harness run wrote beside its samples (`lm_eval_rlae.decisions`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm_eval_rlae.compare.config import methods, short_names
from lm_eval_rlae.compare.stats import paired_interval, wilson
from lm_eval_rlae.decisions import read_decisions

UPPER_BOUNDS = ("oracle routing", "per-document oracle")


def summarize(scores: dict[str, dict[str, dict[str, float]]], seed: int = 0) -> dict:
    """{"tasks": {task: {label: acc, n, ci95}}, "overall": {label: acc, ci95}, "paired": {label: {baseline: (diff, low, high)}}}
    from {label: {task: {document: score}}}, the upper bounds added from the members alone."""
    rng = np.random.default_rng(seed)
    alone = [label for label in scores if label.endswith(" alone")]
    tasks = list(scores[alone[0]])
    scores = dict(scores)
    scores["oracle routing"] = {t: max((scores[m][t] for m in alone), key=lambda s: np.mean(list(s.values()))) for t in tasks}
    scores["per-document oracle"] = {t: {d: max(scores[m][t][d] for m in alone) for d in scores[alone[0]][t]} for t in tasks}
    summary: dict = {"tasks": {}, "overall": {}, "paired": {}}
    for t in tasks:
        for label, per_task in scores.items():
            p, n = float(np.mean(list(per_task[t].values()))), len(per_task[t])
            summary["tasks"].setdefault(t, {})[label] = {"acc": p, "n": n, "ci95": list(wilson(p, n))}
    for label, per_task in scores.items():
        zero = {t: {d: 0.0 for d in per_task[t]} for t in tasks}
        point, low, high = paired_interval(per_task, zero, rng)
        summary["overall"][label] = {"acc": point, "ci95": [low, high]}
    best_single = max(alone, key=lambda label: summary["overall"][label]["acc"])
    baselines = {"best single member": best_single, "uniform": "uniform", "best fixed": "best fixed"}
    summary["best single member"] = best_single
    for label in scores:
        if label in alone or label in UPPER_BOUNDS:
            continue
        summary["paired"][label] = {
            name: paired_interval(scores[label], scores[base], rng) for name, base in baselines.items() if base in scores and base != label
        }
    return summary


def markdown(summary: dict, cost: dict[str, dict], caption: str) -> str:
    labels = list(summary["overall"])
    tasks = list(summary["tasks"])
    lines = [f"| task | n | {' | '.join(labels)} |", "|" + " --- |" * (2 + len(labels))]
    for t in tasks:
        cells = [f"{100 * c['acc']:.1f} [{100 * c['ci95'][0]:.0f}, {100 * c['ci95'][1]:.0f}]" for c in (summary["tasks"][t][label] for label in labels)]
        lines.append(f"| {t} | {summary['tasks'][t][labels[0]]['n']} | {' | '.join(cells)} |")
    total = sum(summary["tasks"][t][labels[0]]["n"] for t in tasks)
    overall = [f"**{100 * o['acc']:.1f}** [{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}]" for o in summary["overall"].values()]
    lines.append(f"| **mean of {len(tasks)} tasks** | {total} | {' | '.join(overall)} |")
    baselines = ["best single member", "uniform", "best fixed"]
    lines += ["", f"| method | {' | '.join(f'vs {b}' for b in baselines)} |", "|" + " --- |" * (1 + len(baselines))]
    for label, diffs in summary["paired"].items():
        cells = [f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if (d := diffs.get(b)) else "—" for b in baselines]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "| method | wall time s | ms per generated token | scoring requests / s | peak memory GiB (RSS / GPU) |", "| --- | --- | --- | --- | --- |"]
    for label, c in cost.items():
        gen, score = c["generate_until"], c["loglikelihood"]
        ms = f"{1000 * gen['seconds'] / c['generated_tokens']:.1f}" if c["generated_tokens"] else "—"
        rps = f"{score['requests'] / score['seconds']:.1f}" if score["seconds"] else "—"
        gpu = f"{c['peak_gpu_gib']:.2f}" if c.get("peak_gpu_gib") is not None else "—"
        lines.append(f"| {label} | {c['seconds']:.0f} | {ms} | {rps} | {c['peak_rss_gib']:.2f} / {gpu} |")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def accuracy_plot(summary: dict, path: Path, title: str) -> None:
    """Bars per task and method with their 95% intervals, and the overall means beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    labels = list(summary["overall"])
    fig, (ax, ax_mean) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": [5, 1]})
    width = 0.8 / len(labels)
    # tab10 repeats after 10 methods: past that, tab20's dark shades first, then its light ones
    colors = [plt.get_cmap("tab20")((2 * k) % 20 + (2 * k) // 20) for k in range(len(labels))] if len(labels) > 10 else [f"C{k}" for k in range(len(labels))]
    for k, label in enumerate(labels):
        accs = np.array([summary["tasks"][t][label]["acc"] for t in tasks])
        cis = np.array([summary["tasks"][t][label]["ci95"] for t in tasks])
        x = np.arange(len(tasks)) + k * width
        ax.bar(x, 100 * accs, width, label=label, color=colors[k])
        ax.errorbar(x, 100 * accs, yerr=100 * np.abs(cis.T - accs), fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
        o = summary["overall"][label]
        ax_mean.bar(k, 100 * o["acc"], 0.8, color=colors[k])
        ax_mean.errorbar(k, 100 * o["acc"], yerr=[[100 * (o["acc"] - o["ci95"][0])], [100 * (o["ci95"][1] - o["acc"])]], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([t.removeprefix("bb_") for t in tasks], rotation=55, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%), 95% interval")
    top = max(summary["tasks"][t][label]["ci95"][1] for t in tasks for label in labels)
    ax.set_ylim(0, min(100, 100 * top + 3))
    ax.legend(fontsize=8, ncol=min(len(labels), 6), loc="lower left", bbox_to_anchor=(0, 1.01), frameon=False)  # above the bars
    fig.suptitle(title)
    ax_mean.set_xticks(range(len(labels)))
    ax_mean.set_xticklabels(labels, rotation=55, ha="right", fontsize=8)
    ax_mean.set_title(f"mean of {len(tasks)} tasks")
    lows = [o["ci95"][0] for o in summary["overall"].values()]
    ax_mean.set_ylim(max(0, 100 * min(lows) - 5), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_document(lines: list[dict]) -> dict[str, dict[int, list[float]]]:
    """{doc_id: {span: weights}} from one task's decisions lines: a generation's weights per span, or
    a scored document's one decision (its choices share their context, so the first choice's)."""
    out: dict[str, dict[int, list[float]]] = {}
    for line in lines:
        if line["repeat"]:
            continue
        doc = str(line["doc_id"])
        if line["request_type"] == "generate_until":
            out[doc] = dict(enumerate(line["spans"]))
        else:
            out.setdefault(doc, {0: line["weights"]})
    return out


def weight_plots(decisions: dict[str, dict[str, dict[str, dict[int, list[float]]]]], members: list[str], out: Path) -> list[Path]:
    """Per agent: its weights over the spans of sample generation documents (one line per member),
    and the distribution of each member's weight per task (one box per member; with two members the
    second box mirrors the first). `decisions`: {label: {task: per_document(its decisions lines)}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = short_names(members)
    written = []
    for label, by_task in decisions.items():
        per_doc = {(task, doc): spans for task, docs in by_task.items() for doc, spans in docs.items()}
        long = sorted((d for d, spans in per_doc.items() if len(spans) > 1), key=lambda d: (d[0], int(d[1]) if d[1].isdigit() else d[1]))
        samples = [long[i] for i in np.linspace(0, len(long) - 1, min(6, len(long))).astype(int)] if long else []
        fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
        for k, (task, doc) in enumerate(samples):
            spans = sorted(per_doc[(task, doc)])
            for m, name in enumerate(names):
                axes[0].plot(spans, [per_doc[(task, doc)][s][m] for s in spans], color=f"C{k}", linestyle=("-", "--", ":", "-.")[m % 4],
                             marker="o", markersize=3, label=f"{task.removeprefix('bb_')} #{doc}, {name}")
        axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # spans are counted
        axes[0].set_xlabel("span (decision) index")
        axes[0].set_ylabel("weight")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].set_title(f"{label}: weights over the spans of sample documents", fontsize=10)
        if samples:
            axes[0].legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # below: keep the lines clear
        else:
            axes[0].text(0.5, 0.5, "no generation document took more than one decision", ha="center", transform=axes[0].transAxes)
        tasks = sorted({task for task, _ in per_doc})
        width = 0.8 / len(names)
        for m, name in enumerate(names):
            data = [[spans[s][m] for (t, _), spans in per_doc.items() if t == task for s in spans] for task in tasks]
            if tasks:
                boxes = axes[1].boxplot(data, positions=np.arange(len(tasks)) + (m - (len(names) - 1) / 2) * width, widths=0.9 * width,
                                        showfliers=False, patch_artist=True, manage_ticks=False)
                for box in boxes["boxes"]:
                    box.set(facecolor=f"C{m}", alpha=0.6)
                axes[1].plot([], [], color=f"C{m}", linewidth=6, alpha=0.6, label=name)  # the legend's swatch
        if tasks:
            axes[1].set_xticks(range(len(tasks)))
            axes[1].set_xticklabels([t.removeprefix("bb_") for t in tasks], rotation=55, ha="right", fontsize=8)
            axes[1].legend(fontsize=7, loc="upper right")
        axes[1].set_ylabel("weight")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_title(f"{label}: each member's weight per task, every decision", fontsize=10)
        fig.tight_layout()
        path = out / f"weights_{label.replace(' ', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def report(config, runs, labels: list[str], output: Path) -> dict:
    """Read every (method, task) run and write table.md, table.json and the plots into `output`."""
    plan = methods(config)
    scores, cost, decisions = {}, {}, {}
    for label in labels:
        saved = {t: runs.load(label, t, runs.key(*plan[label], t)) for t in config.tasks}
        scores[label] = {t: s["scores"] for t, s in saved.items()}
        harness_runs = {s["run"] for s in saved.values()}
        parts = [json.loads((runs.path(label, config.tasks[0]).parent / name / "cost.json").read_text()) for name in sorted(harness_runs)]
        cost[label] = {
            kind: {"seconds": sum(p[kind]["seconds"] for p in parts), "requests": sum(p[kind]["requests"] for p in parts)}
            for kind in ("generate_until", "loglikelihood", "loglikelihood_rolling")
        } | {
            "generated_tokens": sum(p["generated_tokens"] for p in parts),
            "seconds": sum(p["seconds"] for p in parts),
            "peak_rss_gib": max(p["peak_rss_gib"] for p in parts),
            "peak_gpu_gib": max((p["peak_gpu_gib"] for p in parts if p["peak_gpu_gib"] is not None), default=None),
        }
        if "agent=" in plan[label][1] and ",calibrate=0" in plan[label][1]:  # an agent's own weights (calibrated: partly members alone)
            decisions[label] = {t: per_document(read_decisions(runs.path(label, t).parent / s["run"], t)) for t, s in saved.items()}
            if not any(decisions[label].values()):
                print(f"{label}: its harness runs wrote no decisions files (made before lm-eval-rlae wrote them?): no weight plot; "
                      f"delete {runs.path(label, config.tasks[0]).parent} to run it again")
                del decisions[label]
    summary = summarize(scores)
    summary |= {"members": config.members, "split": config.split, "limit": config.limit, "methods": {label: list(plan[label]) for label in labels}, "cost": cost}
    caption = (
        f"Accuracy (%) of each task's first metric from the harness's logged samples, first {config.limit} {config.split} documents "
        f"per task (all where fewer), with 95% Wilson intervals; the mean over tasks with a 95% bootstrap interval; paired "
        f"differences in points with 95% paired bootstrap intervals over the same documents; best single member: "
        f"{summary['best single member']}. Upper bounds from the members alone: oracle routing (each task to its better "
        f"member), per-document oracle (right where any member is right). Generated tokens are counted in {config.members[0]}'s "
        f"tokens for every method; wall time includes loading the models. Methods: "
        + "; ".join(f"{label} = --model {model} {args}" for label, (model, args) in plan.items() if label in labels) + "."
    )
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(markdown(summary, cost, caption))
    (output / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    accuracy_plot(summary, output / "accuracy.png", f"{' + '.join(short_names(config.members))}: members alone, ensembles, agents, upper bounds ({config.split} split)")
    weight_plots(decisions, config.members, output)
    print(markdown(summary, cost, caption))
    return summary

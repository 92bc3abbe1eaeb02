"""`rlae-best-fixed`: the best single fixed weight vector for a config's members and tasks, chosen on
the VALIDATION split: the bar a learned agent must clear.

    rlae-best-fixed --config trainer/configs/specialists.yaml [--step 0.1] [--out runs/specialists-fixed]

Every point of a grid over the simplex (weights in multiples of `step`) is evaluated on the
validation documents of every task, through the same env the agents are validated with (cached
scores for multiple choice, live decoding for generation), and scored as the mean over tasks of each
task's metric. Writes `best_fixed.json` (every point's per-task scores, the winner) and prints the
winner as the `--model_args weights=[...]` that reruns it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from lm_eval_rlae.files import write_text
from trainer.agents.run import Run, constant, load_config, summary


def simplex_grid(n_members: int, step: float) -> list[tuple[float, ...]]:
    """Weight vectors with entries in multiples of `step` summing to 1."""
    k = round(1 / step)
    if abs(k * step - 1) > 1e-9:
        raise ValueError(f"step={step} must divide 1")
    return [tuple(c / k for c in combo) + (1 - sum(combo) / k,) for combo in itertools.product(range(k + 1), repeat=n_members - 1) if sum(combo) <= k]


def search(run: Run, step: float) -> dict:
    points = []
    for weights in tqdm(simplex_grid(len(run.members), step), desc="fixed weights on validation", unit="point"):
        scores = summary(run.evaluate("validation", constant(weights)), run.shares)
        points.append({"weights": [round(w, 6) for w in weights], "validation": scores})
        tqdm.write(f"weights {points[-1]['weights']}: {scores['mean']:.4f}")
    best = max(points, key=lambda p: p["validation"]["mean"])
    return {"members": list(run.config.members), "tasks": list(run.shares), "split": "validation", "best": best, "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlae-best-fixed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an rlae-train config (members, tasks, val_docs)")
    parser.add_argument("--step", type=float, default=0.1, help="grid step on the simplex (default %(default)s)")
    parser.add_argument("--val_docs", type=int, default=None, help="validation documents per task (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<config name>-fixed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, {"val_docs": args.val_docs})
    out = args.out or Path("runs") / f"{args.config.stem}-fixed"
    result = search(Run(config, splits=("validation",)), args.step)
    write_text(out / "best_fixed.json", json.dumps(result, indent=2) + "\n")  # whole: `make compare` skips the search when it exists
    weights = ",".join(f"{w:g}" for w in result["best"]["weights"])
    print(f"best fixed weights on validation: weights=[{weights}] (mean {result['best']['validation']['mean']:.4f}); written {out / 'best_fixed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

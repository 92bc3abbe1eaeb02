"""How fast the training env steps its generation documents, step by step and with speculative decoding.

    python -m trainer.agents.env_speed --config trainer/configs/specialists.yaml [--steps 16] [--rows 32 ...]

The config's training env (`Run`), on its generation tasks only (`mc_rows` 0: a multiple-choice step
mixes cached scores and runs no model), with its untrained agent reading the state after every span
as in training. Each way of decoding restarts the env's episodes from the same documents and steps
every row `--steps` times with the same random Dirichlet weights (a fresh agent's actions look like
that), resetting rows whose episode ended, as Tianshou's Collector does; the prompts' forwards count
in. It prints env steps per second both ways (after an untimed warm-up step). Both ways must give
every episode the same reward, or it stops: speculative decoding must not change a text.
Every TrainConfig field is a flag, e.g. `--train_docs 50 --rows 8`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from lm_eval_rlae import dataclass_config
from trainer.agents.run import Run, TrainConfig, load_config


@dataclasses.dataclass
class Speed:
    steps_per_second: float
    rewards: list[tuple[int, float]]  # (row, reward) of every episode that ended, in order
    counts: object  # the engine's `speculative.Counts` over the timed steps


def generation_only(config: TrainConfig) -> TrainConfig:
    """The config on its generation leaf tasks (with their shares), no multiple-choice rows."""
    from trainer.agents.tasks import TaskMixture

    mixture = TaskMixture(config.tasks, config.splits, config.include_path)
    tasks = {leaf: mixture.shares[leaf] for leaf, task in mixture.tasks.items() if task.OUTPUT_TYPE == "generate_until"}
    if not tasks:
        raise SystemExit(f"no generation task in tasks {config.tasks}: nothing to time")
    return dataclasses.replace(config, tasks=tasks, mc_rows=0, holdout=[], folds=[], fold=None)


def measure(run: Run, documents: dict, speculative: bool, steps: int, seed: int) -> Speed:
    """`steps` env steps of every row from the samplers' state `documents`, with weights drawn from
    `seed`, decoded one way."""
    from lm_eval_rlae.engine.speculative import Counts

    engine, env = run.engine, run.env
    engine.speculative, engine.drafting.counts = speculative, Counts()
    run.load_sampler_state(documents)
    rng = np.random.default_rng(seed)
    rewards = []
    start = time.perf_counter()
    env.reset()
    for _ in range(steps):
        _, reward, done, _, _ = env.step(rng.dirichlet(np.ones(env.n_members), size=env.n_rows))
        ended = np.flatnonzero(done)
        rewards += [(int(row), float(reward[row])) for row in ended]
        if len(ended):
            env.reset(ended)
    seconds = time.perf_counter() - start
    env.close()
    return Speed(steps * env.n_rows / seconds, rewards, engine.drafting.counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.agents.env_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a YAML of TrainConfig fields (trainer/configs/)")
    parser.add_argument("--steps", type=int, default=16, help="timed env steps of every row, each way")
    dataclass_config.add_flags(parser, TrainConfig)
    args = vars(parser.parse_args(argv))
    path, steps = args.pop("config"), args.pop("steps")
    if steps < 1:
        parser.error("--steps must be at least 1")
    config = generation_only(load_config(path, args))
    run = Run(config, splits=("train",))
    documents = run.sampler_state()  # every way starts from these
    print(f"{config.rows} rows of generation documents from {len(config.tasks)} tasks, members {', '.join(config.members)}, "
          f"span {config.span_length}; {steps} steps of every row each way, random Dirichlet weights")
    measure(run, documents, speculative=False, steps=1, seed=config.seed)  # warm-up: first forwards, tables built on first use
    plain = measure(run, documents, speculative=False, steps=steps, seed=config.seed)
    drafted = measure(run, documents, speculative=True, steps=steps, seed=config.seed)
    if drafted.rewards != plain.rewards:
        raise SystemExit(f"speculative decoding changed the episodes' rewards: {drafted.rewards} vs {plain.rewards} step by step")
    counts = drafted.counts
    print(f"env generation steps per second, step by step: {plain.steps_per_second:.2f}")
    print(f"env generation steps per second, speculative: {drafted.steps_per_second:.2f} ({drafted.steps_per_second / plain.steps_per_second:.2f}x), "
          f"acceptance {counts.acceptance:.2f}, tokens per verify pass {counts.tokens_per_round:.2f} ({counts.rounds} verify passes, "
          f"{counts.steps} plain steps), {len(plain.rewards)} episodes ended, same rewards")
    return 0


if __name__ == "__main__":
    sys.exit(main())

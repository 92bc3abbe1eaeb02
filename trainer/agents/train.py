"""`rlae-train`: train an RLAE agent (PPO or MAPPO, Tianshou) on harness tasks.

    rlae-train --config trainer/configs/specialists.yaml --algorithm mappo [--epochs 4 ...]

One typed config (`TrainConfig`; YAML, every field overridable by a flag of the same name) says
everything: members, tasks and their mixture, algorithm, state, span length, hyperparameters, seed.
The loop, top to bottom:

  score the multiple-choice documents of train and validation once (cached on disk)
  evaluate uniform weights and the configured baselines on validation (the bars to beat)
  for each epoch:
      restart the env's episodes
      repeat updates_per_epoch times: collect (rows + mc_rows) x steps_per_collect env steps (Tianshou
          Collector over `EnsembleEnv`), one PPO/MAPPO update, TensorBoard scalars
      validate the agent (deterministic: the mean weights, as at evaluation) on the validation split
      write `last/` (and `best/` when validation improved): agents `--model_args agent=DIR` loads
      write the training checkpoint (networks, optimizer, counters, every RNG, the env's samplers)

With `rollout_workers: N` the env's rows are stepped on N Ray workers, each with its own members
(`trainer.agents.rollouts`); the learner, its updates and validation stay in this process.

Run the same command again after a kill and it resumes from the last checkpoint; as episodes restart
at epoch boundaries and every RNG is restored, the resumed run is the run that was not killed (bit for
bit with `speculative: false`; speculative decoding gives the same texts, but members' states rounded
by forwards of widths that follow measured speed).
Outputs in `out` (default `runs/<config name>-<algorithm>`): config.json, tb/ (TensorBoard),
checkpoint/, best/, last/, validation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm_eval_rlae import dataclass_config
from lm_eval_rlae.files import write_text
from lm_eval_rlae.policies.agent import save_agent
from trainer.agents.run import Run, TrainConfig, agent_weights, constant, load_config, summary

logger = logging.getLogger("rlae-train")


def train(config: TrainConfig, restart: bool = False) -> Path:
    from tianshou.data import Collector, VectorReplayBuffer
    from tianshou.utils.torch_utils import policy_within_training_step, torch_train_mode
    from torch.utils.tensorboard import SummaryWriter

    from trainer.agents.checkpoint import CheckpointError, load_state, save_state

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        saved = None if restart else load_state(out / "checkpoint")
    except CheckpointError as error:
        raise SystemExit(str(error)) from error
    if saved is not None and not config.resumable_from(saved["config"]):
        raise SystemExit(f"{out}/checkpoint is from another config; run with --restart to start over, or give another --out")
    from trainer.agents.algorithms import build

    run = Run(config)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config) | {"leaf_tasks": run.mixture.record()}, indent=2) + "\n")
    c = config
    env, samplers = run.env, run  # where training episodes are stepped, and who holds their samplers
    if c.rollout_workers:
        from trainer.agents.rollouts import RayEnv

        env = samplers = RayEnv(c, run.env.action_space, run.env.observation_space)
    algorithm = build(c.algorithm, run.agent.actor, run.features.layout, c.network(), c)
    policy = algorithm.policy
    writer = SummaryWriter(str(out / "tb"))
    if saved is None:
        history = {"baselines": {}, "epochs": []}
        for name, weights in {"uniform": [1.0] * len(c.members), **c.baselines}.items():
            history["baselines"][name] = summary(run.evaluate("validation", constant(weights)), run.shares)
            logger.info("validation, %s weights %s: %.4f", name, weights, history["baselines"][name]["mean"])
        epoch, env_steps, best = 0, 0, -np.inf
    else:
        algorithm.load_state_dict(saved["algorithm"])
        samplers.load_sampler_state(saved["samplers"])
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(saved["numpy_rng"])
        random.setstate(saved["python_rng"])
        history, epoch, env_steps, best = saved["history"], saved["epoch"], saved["env_steps"], saved["best"]
        logger.info("resumed from %s/checkpoint after epoch %d", out, epoch)

    rows = len(env)
    buffer = VectorReplayBuffer(rows * c.steps_per_collect, rows)
    collector = Collector(policy, env, buffer)
    total = c.epochs * c.updates_per_epoch
    bar = tqdm(total=total, initial=epoch * c.updates_per_epoch, desc=f"rlae-train {c.algorithm}", unit="update")
    while epoch < c.epochs:
        collector.reset_env()  # episodes restart at epoch boundaries, so a checkpoint holds no half episode
        for _ in range(c.updates_per_epoch):
            start = time.perf_counter()
            with policy_within_training_step(policy), torch_train_mode(policy, False):
                collect = collector.collect(n_step=rows * c.steps_per_collect)
            collect_seconds = time.perf_counter() - start
            env_steps += collect.n_collected_steps
            rollout = _rollout_scalars(buffer, c.members)
            with policy_within_training_step(policy):
                before = _policy_snapshot(algorithm, buffer)
                stats = algorithm.update(buffer=buffer, batch_size=c.minibatch, repeat=c.repeat)
                after = _ppo_diagnostics(algorithm, before, c.eps_clip)
            buffer.reset()
            scalars = {
                "loss/policy": stats.actor_loss.mean,
                "loss/value": stats.vf_loss.mean,
                "loss/entropy": stats.ent_loss.mean,
                **after,
                "speed/env_steps_per_s": collect.n_collected_steps / collect_seconds,
                "speed/update_s": time.perf_counter() - start - collect_seconds,
                **rollout,
            }
            if c.rollout_workers:
                scalars["rollouts/worker_restarts"] = sum(env.restarts)
            for key, value in scalars.items():
                writer.add_scalar(key, value, env_steps)
            bar.set_postfix(ret=f"{rollout.get('train/return', float('nan')):.3f}", kl=f"{after['train/approx_kl']:.4f}", sps=f"{scalars['speed/env_steps_per_s']:.1f}")
            bar.update(1)
        epoch += 1
        validation = summary(run.evaluate("validation", agent_weights(policy.actor)), run.shares)
        history["epochs"].append({"epoch": epoch, "env_steps": env_steps, "validation": validation})
        writer.add_scalar("validation/agent", validation["mean"], env_steps)
        for name, values in history["baselines"].items():
            writer.add_scalar(f"validation/{name}", values["mean"], env_steps)
        for task, value in validation.items():
            writer.add_scalar(f"validation_task/{task}", value, env_steps)
        writer.flush()
        tqdm.write(
            f"epoch {epoch}: validation {validation['mean']:.4f} ("
            + ", ".join(f"{name} {values['mean']:.4f}" for name, values in history["baselines"].items())
            + ")"
        )
        spec = dataclasses.replace(run.spec, training=run.spec.training | {"epoch": epoch, "env_steps": env_steps, "validation": validation})
        save_agent(out / "last", spec, policy.actor)
        if validation["mean"] > best:
            best = validation["mean"]
            save_agent(out / "best", spec, policy.actor)
        write_text(out / "validation.json", json.dumps(history, indent=2) + "\n")
        save_state(
            out / "checkpoint",
            {
                "config": dataclasses.asdict(config),
                "algorithm": algorithm.state_dict(),
                "samplers": samplers.sampler_state(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate(),
                "history": history,
                "epoch": epoch,
                "env_steps": env_steps,
                "best": best,
            },
        )
    bar.close()
    writer.close()
    env.close()
    return out


def _rollout_scalars(buffer, member_names: list[str]) -> dict[str, float]:
    """Episodic return, and the mean weight of each member per task and per span index."""
    batch, _ = buffer.sample(0)
    weights = np.asarray(batch.act, dtype=np.float64)
    weights = weights / weights.sum(-1, keepdims=True)
    tasks, spans = np.asarray(batch.info["task"]), np.asarray(batch.info["span"])
    done = np.asarray(batch.done, dtype=bool)
    out = {"train/return": float(np.mean(batch.rew[done])) if done.any() else float("nan")}
    for key, selector in [*((f"weight_task/{t}", tasks == t) for t in np.unique(tasks)), *((f"weight_span/{s}", spans == s) for s in np.unique(spans))]:
        for m, name in enumerate(member_names):
            out[f"{key}/{name}"] = float(weights[selector, m].mean())
    for t in np.unique(tasks):
        finished = done & (tasks == t)
        if finished.any():
            out[f"train_return/{t}"] = float(np.mean(batch.rew[finished]))
    return out


@torch.no_grad()
def _policy_snapshot(algorithm, buffer) -> dict:
    """What the update starts from: the rollout with its returns, old log-probs and old values."""
    batch, indices = buffer.sample(0)
    batch = algorithm._preprocess_batch(batch, buffer, indices)
    return {"batch": batch, "logp_old": batch.logp_old.reshape(len(batch.act), -1), "v_old": batch.v_s, "returns": batch.returns}


@torch.no_grad()
def _ppo_diagnostics(algorithm, before: dict, eps_clip: float) -> dict[str, float]:
    """CleanRL's: approximate KL (old -> new), clip fraction, explained variance of the old values."""
    batch = before["batch"]
    logp_new = algorithm.policy(batch).dist.log_prob(batch.act).reshape(len(batch.act), -1)
    log_ratio = logp_new - before["logp_old"]
    returns, values = before["returns"], before["v_old"]
    variance = returns.var()
    return {
        "train/approx_kl": float(((log_ratio.exp() - 1) - log_ratio).mean()),
        "train/clip_fraction": float(((log_ratio.exp() - 1).abs() > eps_clip).float().mean()),
        "train/explained_variance": float(1 - (returns - values).var() / variance) if variance > 0 else float("nan"),
    }


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlae-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a YAML of TrainConfig fields (trainer/configs/)")
    parser.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")
    dataclass_config.add_flags(parser, TrainConfig)
    args = vars(parser.parse_args(argv))
    path, restart = args.pop("config"), args.pop("restart")
    config = load_config(path, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = train(config, restart=restart)
    print(f"agents: {out / 'best'} (best validation), {out / 'last'}; TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

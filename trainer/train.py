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
(`trainer.rollouts`); the learner, its updates and validation stay in this process.

Run the same command again after a kill and it resumes from the last checkpoint; as episodes restart
at epoch boundaries and every RNG is restored, the resumed run is the run that was not killed.
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
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm_eval_rlae import dataclass_config
from lm_eval_rlae.offline.data import TASK_CONFIGS
from lm_eval_rlae.policies.agent import AgentPolicy, AgentSpec, NetworkConfig, save_agent
from lm_eval_rlae.policies.state import TEXT_ENCODER, make_state_features
from trainer.tasks import OUTPUT_TYPES

logger = logging.getLogger("rlae-train")


@dataclasses.dataclass
class TrainConfig:
    """One training run. YAML keys and command-line flags have these names."""

    members: list[str]  # as in --model_args members=[...], in order
    tasks: dict[str, float]  # harness task -> its share of the training episodes (normalised)
    algorithm: str = "ppo"  # ppo (one actor, Dirichlet) | mappo (one actor per member, centralised critic)
    state: str = "members"  # members (read off the members) | text (sentence encoder over prompt + output)
    text_encoder: str = TEXT_ENCODER  # the `text` state's encoder: all-minilm-l6-v2 (PyPI) or a HF id
    span_length: int = 4  # union tokens generated between two decisions
    include_path: str | None = str(TASK_CONFIGS)  # where tasks beyond the harness's own are found
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> reward metric (default: its first)
    train_docs: int = 400  # per task: the first N of its hash-ordered train split
    val_docs: int = 40  # per task: the first N of its validation split
    test_docs: int = 100  # per task, for rlae-agent-table: the first N of its test split (as lm_eval --limit N)
    rows: int = 32  # episodes stepped together (the env's batch)
    mc_rows: int = 0  # more rows, drawing only (cached, ~300x cheaper) multiple-choice documents; the
    # `rows` then draw only generation documents, and each kind keeps the mixture's ratios within it
    steps_per_collect: int = 4  # env steps per row collected before each update
    updates_per_epoch: int = 10
    epochs: int = 6
    repeat: int = 4  # passes over each rollout per update
    minibatch: int = 64  # transitions per gradient step
    lr: float = 3e-4
    eps_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.001
    max_grad_norm: float = 0.5
    gae_lambda: float = 0.95
    gamma: float = 1.0  # rewards come at the episode's end; nothing to discount
    embed: int = 64  # agent network: projection of each hidden state / text embedding
    hidden: list[int] = dataclasses.field(default_factory=lambda: [128, 128])
    alpha_min: float = 0.2
    alpha_max: float = 200.0
    baselines: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # fixed weights shown beside the agent
    eval_rows: int = 64  # documents decoded together when validating
    seed: int = 1234
    device: str | None = None  # members' device (default: the GPU if there is one)
    rollout_workers: int = 0  # Ray workers collecting the training episodes, each with its own members
    # and a share of the rows (trainer.rollouts); 0: collect in this process
    ray_address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); default: start a local one
    cache: str | None = None  # scores of multiple-choice documents (default: $RLAE_CACHE/agents/scores)
    out: str | None = None  # default: runs/<config name>-<algorithm>

    def network(self) -> NetworkConfig:
        return NetworkConfig(embed=self.embed, hidden=tuple(self.hidden), alpha_min=self.alpha_min, alpha_max=self.alpha_max)

    def resumable_from(self, other: dict) -> bool:
        """A checkpoint continues this run when everything agrees but where it writes and how many
        epochs it runs (a run can be extended)."""
        free = ("out", "epochs", "test_docs", "ray_address")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free} == {k: v for k, v in other.items() if k not in free}


# ----------------------------------------------------------------------------- setup


class Run:
    """Members, tasks, cached scores, envs and the agent (an untrained actor) of one config."""

    def __init__(self, config: TrainConfig, splits: tuple[str, ...] = ("train", "validation")):
        from lm_eval_rlae.engine.fusion import FusionEngine
        from lm_eval_rlae.engine.members import Member, MemberSpec
        from lm_eval_rlae.offline.presets import cache_dir
        from lm_eval_rlae.policies import UniformPolicy
        from trainer.env import EnsembleEnv
        from trainer.scores import ScoreCache
        from trainer.tasks import load_tasks

        self.config = c = config
        if c.algorithm not in ("ppo", "mappo"):
            raise ValueError(f"algorithm={c.algorithm!r}: choose ppo or mappo")
        _seed_everything(c.seed)
        self.members = [Member(MemberSpec.parse(name, {"device": c.device})) for name in c.members]
        self.engine = FusionEngine(self.members, UniformPolicy(len(self.members)), span_length=c.span_length, seed=c.seed)
        self.features = make_state_features(c.state, self.members, self.engine.union, c.text_encoder)
        self.spec = AgentSpec(
            algorithm=c.algorithm,
            members=list(c.members),
            vocab_fingerprints=[member.vocab.fingerprint for member in self.members],
            state=c.state,
            layout=self.features.layout,
            span_length=c.span_length,
            network=c.network(),
            text_encoder=c.text_encoder,
            training={"tasks": c.tasks, "metrics": c.metrics, "config": dataclasses.asdict(c)},
        )
        self.agent = AgentPolicy(self.spec, self.spec.build_actor(), features=self.features)
        self.engine.use(self.agent)

        names = list(c.tasks)
        limits = {"train": c.train_docs, "validation": c.val_docs, "test": c.test_docs}
        self.tasks = {split: load_tasks(names, split, c.include_path, limits[split], c.metrics) for split in splits}
        cache = ScoreCache(Path(c.cache) if c.cache else cache_dir() / "agents" / "scores", self.engine, self.features)
        self.scored = {
            split: {name: cache.documents(task) for name, task in tasks.items() if task.kind == "multiple_choice"}
            for split, tasks in self.tasks.items()
        }
        if "train" in splits:
            self.samplers, rows = _row_samplers(self.tasks["train"], c.tasks, c.rows, c.mc_rows, c.seed)
            self.env = EnsembleEnv(self.engine, self.features, self.tasks["train"], self.scored["train"], len(rows), c.span_length, rows)
        # Evaluation splits: every document once, decoded `eval_rows` at a time.
        self.eval_envs = {
            split: EnsembleEnv(self.engine, self.features, self.tasks[split], self.scored[split], c.eval_rows, c.span_length)
            for split in splits
            if split != "train"
        }

    def evaluate(self, split: str, act: typing.Callable, speed: dict | None = None) -> dict[str, list[float]]:
        """{task: per-document rewards} of `split` with weights from `act` (and env steps/s in `speed`)."""
        return evaluate(self.eval_envs[split], self.tasks[split], act, speed)

    def sampler_state(self) -> dict:
        return {name: sampler.state_dict() for name, sampler in self.samplers.items()}

    def load_sampler_state(self, state: dict) -> None:
        for name, sampler in self.samplers.items():
            sampler.load_state_dict(state[name])


def _row_samplers(tasks: dict, ratios: dict[str, float], rows: int, mc_rows: int, seed: int):
    """The train env's samplers by name, and the sampler of each row ([rows + mc_rows])."""
    from trainer.env import DocumentSampler

    def sampler(names: list[str], seed: int) -> DocumentSampler:
        return DocumentSampler({name: len(tasks[name]) for name in names}, ratios, seed)

    if mc_rows == 0:
        mixture = sampler(list(tasks), seed)
        return {"mixture": mixture}, [mixture] * rows
    by_kind = {kind: [name for name, task in tasks.items() if task.kind == kind] for kind in OUTPUT_TYPES}
    for kind, names in by_kind.items():
        if not names:
            raise SystemExit(f"mc_rows={mc_rows} splits the rows by kind of task, but no training task is {kind}: set mc_rows to 0")
    samplers = {kind: sampler(names, seed + i) for i, (kind, names) in enumerate(by_kind.items())}
    return samplers, [samplers["generate_until"]] * rows + [samplers["multiple_choice"]] * mc_rows


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- evaluation


def evaluate(env, tasks: dict, act, speed: dict | None = None) -> dict[str, list[float]]:
    """Every document of `tasks` once, weights from `act(obs [R, D]) -> [R, M]`: {task: rewards}.
    `speed`, if given, receives env steps per second for each kind of task (cached multiple choice,
    live generation)."""
    rewards: dict[str, list[float]] = {name: [] for name in tasks}
    for kind in OUTPUT_TYPES:
        documents = [document for task in tasks.values() if task.kind == kind for document in task.documents]
        documents.sort(key=lambda d: d.task.name)  # cohorts of one task decode together
        steps, start = 0, time.perf_counter()
        for first in range(0, len(documents), env.n_rows):
            chunk = documents[first : first + env.n_rows]
            live = list(range(len(chunk)))
            obs, _ = env.reset(live, documents=chunk)
            while live:
                obs, reward, done, _, _ = env.step(act(obs), live)
                steps += len(live)
                for i in np.flatnonzero(done):
                    rewards[chunk[live[i]].task.name].append(float(reward[i]))
                keep = ~done
                live, obs = [row for row, k in zip(live, keep) if k], obs[keep]
        if speed is not None and steps:
            speed[kind] = steps / (time.perf_counter() - start)
    env.close()  # drop the last chunk's decoding state
    return rewards


def summary(rewards: dict[str, list[float]]) -> dict[str, float]:
    """Mean reward per task, and `mean`: the mean over tasks (each task counts once)."""
    per_task = {name: float(np.mean(values)) for name, values in rewards.items()}
    return per_task | {"mean": float(np.mean(list(per_task.values())))}


def constant(weights) -> typing.Callable:
    weights = np.asarray(weights, dtype=np.float32)
    return lambda obs: np.broadcast_to(weights, (len(obs), len(weights)))


def agent_weights(actor) -> typing.Callable:
    @torch.no_grad()
    def act(obs):
        alpha, _ = actor(obs)
        return (alpha / alpha.sum(-1, keepdim=True)).cpu().numpy()

    return act


# ----------------------------------------------------------------------------- training


def train(config: TrainConfig, restart: bool = False) -> Path:
    from tianshou.data import Collector, VectorReplayBuffer
    from tianshou.utils.torch_utils import policy_within_training_step, torch_train_mode
    from torch.utils.tensorboard import SummaryWriter

    from trainer.checkpoint import load_state, save_state

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = None if restart else load_state(out / "checkpoint")
    if saved is not None and not config.resumable_from(saved["config"]):
        raise SystemExit(f"{out}/checkpoint is from another config; run with --restart to start over, or give another --out")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    from trainer.algorithms import build

    run = Run(config)
    c = config
    env, samplers = run.env, run  # where training episodes are stepped, and who holds their samplers
    if c.rollout_workers:
        from trainer.rollouts import RayEnv

        env = samplers = RayEnv(c, run.env.action_space, run.env.observation_space)
    algorithm = build(c.algorithm, run.agent.actor, run.features.layout, c.network(), c)
    policy = algorithm.policy
    writer = SummaryWriter(str(out / "tb"))
    if saved is None:
        history = {"baselines": {}, "epochs": []}
        for name, weights in {"uniform": [1.0] * len(c.members), **c.baselines}.items():
            history["baselines"][name] = summary(run.evaluate("validation", constant(weights)))
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
        for update in range(c.updates_per_epoch):
            step = epoch * c.updates_per_epoch + update
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
        validation = summary(run.evaluate("validation", agent_weights(policy.actor)))
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
        (out / "validation.json").write_text(json.dumps(history, indent=2) + "\n")
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


def load_config(path: Path | None, overrides: dict) -> TrainConfig:
    config = dataclass_config.load(TrainConfig, path, overrides, required=("members", "tasks"))
    if config.out is None:
        config.out = str(Path("runs") / f"{Path(path).stem if path else 'rlae'}-{config.algorithm}")
    return config


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

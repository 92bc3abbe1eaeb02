"""One training configuration, and everything built from it: `TrainConfig` (every field of a run,
YAML and flags), `Run` (members, tasks, cached scores, envs and an untrained agent), and evaluation of
any weighting on a split. `rlae-train` (`train`), its Ray workers (`rollouts`), `rlae-best-fixed` and
`rlae-agent-table` all start here.
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
from pathlib import Path

import numpy as np
import torch

from lm_eval_rlae import dataclass_config
from lm_eval_rlae.offline.data import TASK_CONFIGS
from lm_eval_rlae.policies.agent import AgentPolicy, AgentSpec, NetworkConfig
from lm_eval_rlae.policies.state import TEXT_ENCODER, make_state_features
from trainer.agents.tasks import OUTPUT_TYPES


@dataclasses.dataclass
class TrainConfig:
    """One training run. YAML keys and command-line flags have these names."""

    members: list[str]  # as in --model_args members=[...], in order
    tasks: dict[str, float]  # harness task, glob over leaf tasks or group -> its share of the training episodes
    # (normalised; a group's leaves share it as the group's score weighs them: trainer.agents.tasks.TaskMixture)
    holdout: list[str] = dataclasses.field(default_factory=list)  # tasks held out of training and of every
    # selection (best epoch, best fixed weights): evaluated on their test split as tasks never trained on
    folds: list[list[str]] = dataclasses.field(default_factory=list)  # leave-tasks-out: disjoint groups of
    # `tasks`; `fold: k` holds folds[k] out as `holdout` does (rlae-folds runs every fold)
    fold: int | None = None
    algorithm: str = "ppo"  # ppo (one actor, Dirichlet) | mappo (one actor per member, centralised critic)
    state: str = "members"  # members (read off the members) | stats (their confidence alone) | text (sentence encoder over prompt + output)
    text_encoder: str = TEXT_ENCODER  # the `text` state's encoder: all-minilm-l6-v2 (PyPI) or a HF id
    span_length: int = 4  # union tokens generated between two decisions
    speculative: bool | None = None  # the env drafts and verifies its generation rows (the same texts, fewer
    # forwards where a forward over k tokens costs about one); None: as true. Drafting
    # makes the members' states differ by float rounding with the forwards' widths, which follow measured
    # speed, so only `false` makes a run, and a resumed run, bit-for-bit reproducible
    include_path: str | None = str(TASK_CONFIGS)  # where tasks beyond the harness's own are found
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # task pattern -> reward metric (default: its first)
    splits: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # task pattern (glob over leaves, or a
    # name in `tasks`) -> {train|validation|test: its dataset's split or slice}, e.g. {"mmlu_*": {train: "validation[:80%]"}}
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
    reward_baseline: list[float] | None = None  # fixed weights whose reward on a multiple-choice document is
    # subtracted from the agent's there (trainer.agents.env.EnsembleEnv._baseline_reward); None: the metric alone
    eval_rows: int = 64  # documents decoded together when validating
    seed: int = 1234
    device: str | None = None  # members' device (default: the GPU if there is one)
    rollout_workers: int = 0  # Ray workers collecting the training episodes, each with its own members
    # and a share of the rows (trainer.agents.rollouts); 0: collect in this process
    ray_address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); default: start a local one
    cache: str | None = None  # scores of multiple-choice documents (default: $RLAE_CACHE/agents/scores)
    out: str | None = None  # default: runs/<config name>-<algorithm>

    def __post_init__(self):
        unknown = sorted(set(self.holdout).union(*self.folds) - set(self.tasks))
        if unknown:
            raise SystemExit(f"holdout/folds name {unknown}, which are not in tasks: hold out tasks of the config's own `tasks`")
        seen = [task for fold in self.folds for task in fold]
        if len(seen) != len(set(seen)):
            raise SystemExit(f"folds {self.folds} share tasks: every task is held out by one fold at most")
        if self.fold is not None and not 0 <= self.fold < len(self.folds):
            raise SystemExit(f"fold={self.fold}, but the config has {len(self.folds)} folds: choose 0..{len(self.folds) - 1}")
        if not self.training_tasks():
            raise SystemExit("every task is held out: nothing is left to train on")

    def held_out(self) -> list[str]:
        """Tasks never sampled in training nor read for any selection, in `tasks` order."""
        out = set(self.holdout) | set(self.folds[self.fold] if self.fold is not None else ())
        return [task for task in self.tasks if task in out]

    def training_tasks(self) -> dict[str, float]:
        held_out = self.held_out()
        return {task: ratio for task, ratio in self.tasks.items() if task not in held_out}

    def network(self) -> NetworkConfig:
        return NetworkConfig(embed=self.embed, hidden=tuple(self.hidden), alpha_min=self.alpha_min, alpha_max=self.alpha_max)

    def resumable_from(self, other: dict) -> bool:
        """A checkpoint continues this run when everything agrees but where it writes and how many
        epochs it runs (a run can be extended)."""
        free = ("out", "epochs", "test_docs", "ray_address", "speculative")  # speculative: speed only, the same texts
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free} == {k: v for k, v in other.items() if k not in free}


# ----------------------------------------------------------------------------- setup


class Run:
    """Members, tasks, cached scores, envs and the agent (an untrained actor) of one config."""

    def __init__(self, config: TrainConfig, splits: tuple[str, ...] = ("train", "validation")):
        from lm_eval_rlae.engine.fusion import FusionEngine
        from lm_eval_rlae.engine.members import Member, MemberSpec
        from lm_eval_rlae.offline.presets import cache_dir
        from lm_eval_rlae.policies import UniformPolicy
        from trainer.agents.env import EnsembleEnv
        from trainer.agents.scores import ScoreCache
        from trainer.agents.tasks import TaskMixture

        self.config = c = config
        if c.algorithm not in ("ppo", "mappo"):
            raise ValueError(f"algorithm={c.algorithm!r}: choose ppo or mappo")
        # A bad task or split fails before any model loads. Held-out tasks are a mixture of their own, read on test alone.
        self.mixture = TaskMixture(c.training_tasks(), c.splits, c.include_path, roles=splits)
        held = {task: c.tasks[task] for task in c.held_out()}
        held_out = TaskMixture(held, c.splits, c.include_path, roles=("test",)) if held and "test" in splits else None
        self.shares = self.mixture.shares  # leaf task -> its share of the training episodes and of the validation mean
        _seed_everything(c.seed)
        self.members = [Member(MemberSpec.parse(name, {"device": c.device})) for name in c.members]
        self.engine = FusionEngine(self.members, UniformPolicy(len(self.members)), span_length=c.span_length, seed=c.seed, speculative=c.speculative)
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
            training={
                "tasks": c.training_tasks(),
                "held_out": c.held_out(),
                "leaf_tasks": self.mixture.record(),
                "metrics": c.metrics,
                "config": dataclasses.asdict(c),
            },
        )
        self.agent = AgentPolicy(self.spec, self.spec.build_actor(), features=self.features)
        self.engine.use(self.agent)

        limits = {"train": c.train_docs, "validation": c.val_docs, "test": c.test_docs}
        self.tasks = {split: self.mixture.load(split, limits[split], c.metrics) for split in splits}
        if held_out is not None:  # read on the test split alone: never trained on, never selected on
            self.tasks["test"] |= held_out.load("test", limits["test"], c.metrics)
        cache = ScoreCache(Path(c.cache) if c.cache else cache_dir() / "agents" / "scores", self.engine, self.features)
        self.scored = {
            split: {name: cache.documents(task) for name, task in tasks.items() if task.kind == "multiple_choice"}
            for split, tasks in self.tasks.items()
        }
        if "train" in splits:
            self.samplers, rows = _row_samplers(self.tasks["train"], self.shares, c.rows, c.mc_rows, c.seed)
            self.env = EnsembleEnv(
                self.engine, self.features, self.tasks["train"], self.scored["train"], len(rows), c.span_length, rows, c.reward_baseline
            )
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
    from trainer.agents.env import DocumentSampler

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


def summary(rewards: dict[str, list[float]], shares: dict[str, float] | None = None) -> dict[str, float]:
    """Mean reward per task, and `mean`: the mean over tasks weighted by their `shares` of the mixture
    (a group's leaves weigh as in the group's score), each task once without them."""
    per_task = {name: float(np.mean(values)) for name, values in rewards.items()}
    weights = [shares[name] for name in per_task] if shares else None
    return per_task | {"mean": float(np.average(list(per_task.values()), weights=weights))}


def constant(weights) -> typing.Callable:
    weights = np.asarray(weights, dtype=np.float32)
    return lambda obs: np.broadcast_to(weights, (len(obs), len(weights)))


def agent_weights(actor) -> typing.Callable:
    @torch.no_grad()
    def act(obs):
        alpha, _ = actor(obs)
        return (alpha / alpha.sum(-1, keepdim=True)).cpu().numpy()

    return act



def load_config(path: Path | None, overrides: dict) -> TrainConfig:
    config = dataclass_config.load(TrainConfig, path, overrides, required=("members", "tasks"))
    if config.out is None:
        fold = f"-fold{config.fold}" if config.fold is not None else ""
        config.out = str(Path("runs") / f"{Path(path).stem if path else 'rlae'}-{config.algorithm}{fold}")
    return config

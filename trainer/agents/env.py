"""The RL environment: episodes of harness tasks, B rows stepped together, for Tianshou's Collector.

An episode is one document; an action is one weight per member (any non-negative vector,
normalised here as `WeightPolicy` normalises); the reward, at the episode's end, is the task's own
metric (`trainer.agents.tasks`).

- Multiple-choice document: one step. The observation is the state at the end of the context; the
  step mixes the members' cached scores of every choice under the action (`trainer.agents.scores`, the
  very arithmetic `--model rlae` scores with) and ends the episode. No LLM runs.
- Generation document: one step per span. Rows reset together form a cohort, one
  `fusion.Generation` whose members' forward passes are batched; a step advances every cohort by
  one span under its rows' actions and observes the state after it. A cohort is dropped once all
  its rows have moved on, so at most (longest episode in spans) cohorts live at once.

To the Collector this is a vector env in the EnvPool style (`len`, `reset(env_id=...)`,
`step(action, env_id)`, not async): B copies of the models would cost B times the memory and lose
the batching that makes a step affordable.

Each row draws its documents from its own sampler, so rows can be given to one kind of task: a
multiple-choice step costs about 1/300 of a generation step, and rows that draw only cached
multiple-choice documents give many more episodes per update at almost no cost (`mc_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from lm_eval_rlae.engine.fusion import FusionEngine, Generation, mix
from lm_eval_rlae.policies.state import StateFeatures
from trainer.agents.scores import ScoredDocument
from trainer.agents.tasks import Document, TaskData


@dataclass
class _Episode:
    document: Document
    scored: ScoredDocument | None = None  # multiple choice
    cohort: Generation | None = None  # generation: its batch, and its row in it
    row: int = 0
    span: int = 0


class DocumentSampler:
    """Which document a reset row gets: a task drawn by the mixture's ratios, then that task's next
    document in a seeded shuffle (every document once per pass). Its state is plain JSON, for resuming."""

    def __init__(self, sizes: dict[str, int], ratios: dict[str, float], seed: int):
        self.sizes = sizes
        self.names = list(sizes)
        total = sum(ratios[name] for name in self.names)
        self.probs = np.array([ratios[name] / total for name in self.names])
        self.rng = np.random.default_rng(seed)
        self.order = {name: [] for name in self.names}

    def __call__(self) -> tuple[str, int]:
        name = self.names[self.rng.choice(len(self.names), p=self.probs)]
        if not self.order[name]:
            self.order[name] = self.rng.permutation(self.sizes[name]).tolist()
        return name, self.order[name].pop()

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = {name: list(state["order"][name]) for name in self.names}


class EnsembleEnv:
    is_async = False

    def __init__(
        self,
        engine: FusionEngine,
        features: StateFeatures,
        tasks: dict[str, TaskData],
        scored: dict[str, list[ScoredDocument]],
        n_rows: int,
        span_length: int,
        samplers: list[DocumentSampler] | None = None,  # [n_rows]: where each row's documents come from
        reward_baseline: list[float] | None = None,  # [M] fixed weights: see `_baseline_reward`
    ):
        if samplers is not None and len(samplers) != n_rows:
            raise ValueError(f"{len(samplers)} samplers for {n_rows} rows")
        self.engine, self.features, self.tasks, self.scored = engine, features, tasks, scored
        self.n_rows, self.span_length, self.samplers = n_rows, span_length, samplers
        self.reward_baseline = None if reward_baseline is None else torch.tensor(reward_baseline, dtype=torch.float32) / sum(reward_baseline)
        self._baseline_rewards: dict[tuple[str, str], float] = {}  # (task, document key) -> its reward under the baseline
        self.n_members = len(engine.members)
        self.action_space = gym.spaces.Box(0.0, np.inf, (self.n_members,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (features.layout.size,), dtype=np.float32)
        self.episodes: list[_Episode | None] = [None] * n_rows

    def __len__(self) -> int:
        return self.n_rows

    def close(self) -> None:
        self.episodes = [None] * self.n_rows

    def reset(self, env_id=None, documents: list[Document] | None = None, **_):
        """Start episodes in rows `env_id` (all rows by default): the given documents, else the rows' samplers'."""
        ids = row_ids(env_id, self.n_rows)
        if documents is None:
            documents = [self.tasks[name].documents[index] for name, index in (self.samplers[row]() for row in ids)]
        obs = np.zeros((len(ids), self.features.layout.size), dtype=np.float32)
        generation = [i for i, document in enumerate(documents) if document.task.kind == "generate_until"]
        for i, document in enumerate(documents):
            if i not in generation:
                scored = self.scored[document.task.name][document.index]
                self.episodes[ids[i]] = _Episode(document, scored=scored)
                obs[i] = scored.obs
        decodings = {repr(documents[i].task.decoding): documents[i].task.decoding for i in generation}
        for key, decoding in decodings.items():  # a cohort decodes with one setting
            rows = [i for i in generation if repr(documents[i].task.decoding) == key]
            cohort = Generation(self.engine, [documents[i].contexts[0] for i in rows], decoding)
            obs[rows] = self.features(cohort.state()).numpy()
            for row, i in enumerate(rows):
                self.episodes[ids[i]] = _Episode(documents[i], cohort=cohort, row=row)
        return obs, np.array([self._info(ids[i]) for i in range(len(ids))])

    def step(self, action, env_id=None):
        ids = row_ids(env_id, self.n_rows)
        weights = torch.tensor(np.array(action, dtype=np.float32)).clamp_min(0).reshape(len(ids), self.n_members)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        obs = np.zeros((len(ids), self.features.layout.size), dtype=np.float32)
        reward = np.zeros(len(ids), dtype=np.float32)
        done = np.zeros(len(ids), dtype=bool)
        infos = [self._info(row) for row in ids]
        by_cohort: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            episode = self.episodes[row]
            if episode.cohort is None:  # multiple choice: mix the cached scores and finish
                reward[i] = self._mixed_reward(episode, weights[i]) - self._baseline_reward(episode)
                obs[i], done[i] = episode.scored.obs, True
            else:
                by_cohort.setdefault(id(episode.cohort), []).append(i)
        for members in by_cohort.values():
            cohort = self.episodes[ids[members[0]]].cohort
            cohort_weights = torch.full((len(cohort.rows), self.n_members), 1.0 / self.n_members)
            for i in members:
                cohort_weights[self.episodes[ids[i]].row] = weights[i]
            cohort.advance(cohort_weights, self.span_length)
            state = self.features(cohort.state()).numpy()
            texts = cohort.texts()
            for i in members:
                episode = self.episodes[ids[i]]
                episode.span += 1
                obs[i] = state[episode.row]
                if cohort.rows[episode.row].done or cohort.done:
                    reward[i] = episode.document.reward([texts[episode.row]])
                    done[i] = True
        for i in np.flatnonzero(done):
            self.episodes[ids[i]] = None  # a finished cohort is freed with its last row
        return obs, reward, done, np.zeros(len(ids), dtype=bool), np.array(infos)

    def _mixed_reward(self, episode: _Episode, weights: torch.Tensor) -> float:
        return mixed_reward(episode.document, episode.scored, weights)

    def _baseline_reward(self, episode: _Episode) -> float:
        """With `reward_baseline` (fixed weights), a multiple-choice document's reward is the task's metric
        minus what those weights score on it: the document's own baseline, free from the cached scores. The
        policy gradient stays the same in expectation (the baseline does not depend on the action), but
        documents every weighting gets right, or wrong, stop adding noise, and what is left is where the
        weights matter. Generation documents keep the metric itself (their baseline would cost a decode)."""
        if self.reward_baseline is None:
            return 0.0
        key = (episode.document.task.name, episode.document.key)
        if key not in self._baseline_rewards:
            self._baseline_rewards[key] = self._mixed_reward(episode, self.reward_baseline)
        return self._baseline_rewards[key]

    def _info(self, row: int) -> dict:
        episode = self.episodes[row]
        return {"task": episode.document.task.name, "span": episode.span}


def mixed_reward(document: Document, scored: ScoredDocument, weights: torch.Tensor) -> float:
    """A multiple-choice document's metric under weights [M] (normalised), from its cached scores."""
    choices = len(scored.scored[0])
    return document.reward(mix(scored.scored, weights.expand(choices, -1)))


def row_ids(env_id, n_rows: int) -> list[int]:
    """The rows a Collector's `env_id` names (None: all), as a list."""
    if env_id is None:
        return list(range(n_rows))
    return np.atleast_1d(np.asarray(env_id)).astype(int).tolist()

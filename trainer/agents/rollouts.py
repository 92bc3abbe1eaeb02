"""Distributed rollouts: the training env's rows spread over Ray workers, each with its own members.

    rlae-train --config trainer/configs/specialists.yaml --rollout_workers 2 [--ray_address auto]

Each worker is a Ray actor holding the training side of a `Run` on its own device: the members, the
cached multiple-choice scores, its share of the rows and samplers of its own. The learner (the
`rlae-train` process) keeps the policy, the optimiser, Tianshou's Collector and the buffer, and
sees one EnvPool-style env made of every worker's rows. A step sends each worker its rows' actions
at once and then waits for all of them, so it costs the slowest worker, not the sum.

A worker that dies (killed, out of memory, its node lost) is restarted by Ray (`max_restarts`). The
episodes it held come back truncated at their last observation: the return bootstraps from the
critic's value there, and no reward is invented. The Collector then resets those rows on the
restarted worker. The learner's state never leaves the learner, so none of it is lost.

Why not Tianshou's `RayVectorEnv`: it puts one gym env on each actor and steps each actor one row at
a time. Here a worker's rows share the members' batched forward passes, which is what makes a
generation step affordable (`trainer.agents.env`), so the unit of distribution is a batch of rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import torch

from trainer.agents.env import row_ids

logger = logging.getLogger("rlae-train")


def _ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("rollout_workers needs Ray: pip install 'lm-eval-rlae[ray]' (or rollout_workers: 0 to collect in this process)") from None
    return ray


class RolloutWorker:
    """The training env of one share of the rows (a Ray actor)."""

    def __init__(self, config):
        from trainer.agents.run import Run

        self.run = Run(config, splits=("train",))

    def reset(self, env_id):
        return self.run.env.reset(env_id)

    def step(self, action, env_id):
        return self.run.env.step(action, env_id)

    def sampler_state(self) -> dict:
        return self.run.sampler_state()

    def load_sampler_state(self, state: dict) -> None:
        self.run.load_sampler_state(state)

    def pid(self) -> int:
        return os.getpid()


def worker_configs(config) -> list:
    """Each worker's config: its share of `rows` and `mc_rows`, and a seed of its own."""
    n = config.rollout_workers
    if config.rows < n:
        raise SystemExit(f"rollout_workers={n} but rows={config.rows}: every worker needs at least one row of generation documents")

    def share(total: int, w: int) -> int:
        return total // n + (w < total % n)

    return [dataclasses.replace(config, rows=share(config.rows, w), mc_rows=share(config.mc_rows, w), seed=config.seed + w, rollout_workers=0) for w in range(n)]


class RayEnv:
    """Every worker's rows as one EnvPool-style env (`len`, `reset(env_id)`, `step(action, env_id)`), for
    Tianshou's Collector. Global row r is row `self.local[r]` of worker `self.worker_of[r]`."""

    is_async = False

    def __init__(self, config, action_space, observation_space, max_restarts: int = 3):
        ray = self.ray = _ray()
        if not ray.is_initialized():
            # A local cluster unless an address is given. A worker takes one CPU (one GPU when the members
            # are on CUDA), and Ray sets its threads to match.
            local = {} if config.ray_address else {"num_cpus": max(os.cpu_count() or 1, config.rollout_workers), "include_dashboard": False}
            ray.init(address=config.ray_address, logging_level=logging.WARNING, **local)
        configs = worker_configs(config)
        gpus = 1 if (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=max_restarts)(RolloutWorker)
        self.workers = [actor.remote(c) for c in configs]
        self.worker_of = [w for w, c in enumerate(configs) for _ in range(c.rows + c.mc_rows)]
        self.local = [row for c in configs for row in range(c.rows + c.mc_rows)]
        self.action_space, self.observation_space = action_space, observation_space
        self.max_restarts, self.restarts = max_restarts, [0] * len(self.workers)  # restarts of each worker
        self.last_obs = np.zeros((len(self), observation_space.shape[0]), dtype=np.float32)  # [R, D]
        self.last_info = np.array([{} for _ in range(len(self))])  # [R]
        self.lost: set[int] = set()  # rows whose worker died since they were last reset
        ray.get([worker.pid.remote() for worker in self.workers])  # a worker that cannot start fails here

    def __len__(self) -> int:
        return len(self.worker_of)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)

    def reset(self, env_id=None, **_):
        ids = pending = row_ids(env_id, len(self))
        while pending:  # a worker that dies while resetting is reset again once Ray has restarted it
            for rows, (obs, info) in self._call("reset", pending):
                self.last_obs[rows], self.last_info[rows] = obs, info
                self.lost.difference_update(rows)
            pending = [row for row in pending if row in self.lost]
        return self.last_obs[ids].copy(), self.last_info[ids].copy()

    def step(self, action, env_id=None):
        ids = row_ids(env_id, len(self))
        action = np.asarray(action)  # [len(ids), M]
        reward = np.zeros(len(ids), dtype=np.float32)
        terminated = np.zeros(len(ids), dtype=bool)
        position = {row: i for i, row in enumerate(ids)}
        live = [row for row in ids if row not in self.lost]
        results = self._call("step", live, action[[position[row] for row in live]])
        for rows, (obs, rew, term, _, info) in results:
            at = [position[row] for row in rows]
            self.last_obs[rows], self.last_info[rows], reward[at], terminated[at] = obs, info, rew, term
        # A dead worker's rows end here, truncated at their last observation, with no reward.
        truncated = np.array([row in self.lost for row in ids])
        return self.last_obs[ids].copy(), reward, terminated, truncated, self.last_info[ids].copy()

    def sampler_state(self) -> dict:
        return {str(w): state for w, state in enumerate(self.ray.get([worker.sampler_state.remote() for worker in self.workers]))}

    def load_sampler_state(self, state: dict) -> None:
        self.ray.get([worker.load_sampler_state.remote(state[str(w)]) for w, worker in enumerate(self.workers)])

    def _call(self, method: str, rows: list[int], action=None) -> list[tuple[list[int], tuple]]:
        """`method` on every worker holding some of `rows`, all launched before any is awaited:
        [(that worker's global rows, its result)]. A worker that died is left out, its rows marked lost."""
        calls = []
        for w, worker in enumerate(self.workers):
            mine = [i for i, row in enumerate(rows) if self.worker_of[row] == w]
            if mine:
                local = [self.local[rows[i]] for i in mine]
                args = (local,) if action is None else (action[mine], local)
                calls.append((w, [rows[i] for i in mine], getattr(worker, method).remote(*args)))
        results = []
        for w, mine, future in calls:
            try:
                results.append((mine, self.ray.get(future)))
            except self.ray.exceptions.RayActorError as error:
                self._lose(w, error)
        return results

    def _lose(self, w: int, error) -> None:
        """Worker `w` died: its rows' episodes are lost, and the learner waits until Ray has restarted it."""
        self.restarts[w] += 1
        rows = {row for row, owner in enumerate(self.worker_of) if owner == w}
        logger.warning("rollout worker %d died (%s); Ray restarts it, and its %d episodes in flight end truncated", w, type(error).__name__, len(rows))
        self.lost |= rows
        while True:
            try:
                self.ray.get(self.workers[w].pid.remote())
                return
            except self.ray.exceptions.ActorUnavailableError:  # restarting: its members are loading
                time.sleep(0.5)
            except self.ray.exceptions.ActorDiedError as died:
                raise SystemExit(f"rollout worker {w} died and Ray restarts it no more (max_restarts={self.max_restarts}): {died}") from None

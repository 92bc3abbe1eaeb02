"""RLAE_PPO and RLAE_MAPPO on Tianshou 2 (`tianshou.algorithm.PPO`).

RLAE_PPO: the runtime's `JointActor` gives concentrations alpha [B, M]; the action is a draw of
Dirichlet(alpha), the member weights themselves; one critic. Tianshou's action scaling and clipping
are off: they map actions to [-1, 1] boxes and would leave the simplex.

RLAE_MAPPO: one actor per member (`MemberActors`: actor m sees member m's segments and the shared
ones, nothing else, so it executes decentralised) and a centralised critic over the whole state.
Agent m acts g_m ~ Gamma(alpha_m, 1); the env normalises, weights = g / sum(g), which is again
Dirichlet(alpha) over the weights but factorises over agents. Tianshou 2 has no MAPPO (its
multi-agent manager runs independent learners on turn-based PettingZoo envs), so MAPPO is PPO with
per-agent log-probs: `MemberGammas.log_prob` returns [B, M] rather than a joint [B], and `MAPPO`
keeps the old log-probs [B, M] where PPO flattens them; PPO's own surrogate then takes a ratio per
agent, clips each against the shared advantage (GAE of the centralised critic), and averages. That
is MAPPO's objective; clipping the joint ratio would not be.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tianshou.algorithm import PPO
from tianshou.algorithm.modelfree.reinforce import ProbabilisticActorPolicy
from tianshou.algorithm.optim import AdamOptimizerFactory
from torch import nn

from lm_eval_rlae.policies.agent import NetworkConfig, StateEncoder, mlp
from lm_eval_rlae.policies.state import StateLayout

_FLOOR = 1e-6  # float32 draws can underflow to 0, whose log-prob is -inf


class SimplexDirichlet(torch.distributions.Dirichlet):
    """Dirichlet over the weights; draws kept off the simplex's faces; the mean stands in for the
    mode, so deterministic evaluation here is what the runtime's `AgentPolicy` does."""

    @property
    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        draw = super().sample(sample_shape).clamp_min(_FLOOR)
        return draw / draw.sum(-1, keepdim=True)


class MemberGammas(torch.distributions.Gamma):
    """Independent Gamma(alpha_m, 1), one per agent: log_prob and entropy are [B, M], per agent."""

    def __init__(self, alpha: torch.Tensor):
        super().__init__(alpha, torch.ones_like(alpha))

    @property
    def mode(self) -> torch.Tensor:
        return self.mean  # normalised by the env: alpha / sum(alpha), as the runtime

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return super().sample(sample_shape).clamp_min(_FLOOR)


class Critic(nn.Module):
    """State [B, D] -> value [B, 1], over every member's segments (centralised for MAPPO)."""

    def __init__(self, layout: StateLayout, n_members: int, config: NetworkConfig):
        super().__init__()
        self.encoder = StateEncoder(layout, list(range(n_members)), config)
        self.head = mlp([self.encoder.size, *config.hidden, 1])

    def forward(self, obs, **_) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=next(self.parameters()).device)
        return self.head(self.encoder(obs))


class MAPPO(PPO):
    """PPO with one log-prob per agent ([B, M]), so each agent's ratio is clipped on its own."""

    def _preprocess_batch(self, batch, buffer, indices):
        batch = super()._preprocess_batch(batch, buffer, indices)
        batch.logp_old = batch.logp_old.reshape(len(batch.act), -1)  # PPO flattened [B, M] to [B * M]
        return batch


def build(algorithm: str, actor: nn.Module, layout: StateLayout, network: NetworkConfig, hp) -> PPO:
    """The Tianshou algorithm around the runtime's actor (`JointActor` for ppo, `MemberActors` for
    mappo). `hp`: the PPO hyperparameters (`trainer.agents.train.TrainConfig`)."""
    n_members = actor.n_members
    high = 1.0 if algorithm == "ppo" else np.inf
    policy = ProbabilisticActorPolicy(
        actor=actor,
        dist_fn=SimplexDirichlet if algorithm == "ppo" else MemberGammas,
        deterministic_eval=True,
        action_space=gym.spaces.Box(0.0, high, (n_members,), dtype=np.float32),
        action_scaling=False,
        action_bound_method=None,
    )
    cls = PPO if algorithm == "ppo" else MAPPO
    return cls(
        policy=policy,
        critic=Critic(layout, n_members, network),
        optim=AdamOptimizerFactory(lr=hp.lr),
        eps_clip=hp.eps_clip,
        vf_coef=hp.vf_coef,
        ent_coef=hp.ent_coef,
        max_grad_norm=hp.max_grad_norm,
        gae_lambda=hp.gae_lambda,
        gamma=hp.gamma,
        advantage_normalization=True,
        max_batchsize=1024,
    )

"""Weight policies: for each batch row, a state in and a weight vector over the members out.

The fusion engine calls a policy once per span (`span_length` union tokens) while generating, and
once per request when scoring (the decision point is the end of the context). Learned agents
implement the same interface.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from lm_eval_rlae.model_args import parse_list


@dataclass
class PolicyState:
    """What a policy sees for B rows at the start of a span.

    member_logprobs: M x [B, V_m]  each member's next-token log-probs
    member_hidden:   M x [B, H_m]  each member's final hidden state at the last token
                     (None unless the policy sets `needs_hidden`)
    span_index:      [B]           spans generated so far (0 at the end of the prompt)
    contexts:        B prompts, as given to the ensemble
    generated:       B texts generated so far
    prompt_logppl:   [B, M]        each member's log-perplexity of the prompt: mean negative
                     log-likelihood per token of its own tokens after the first (None unless the
                     policy sets `needs_prompt_perplexity`)
    live:            [B] bool      rows still decoding; a finished row's weights are not used
                     (None: every row, as when scoring)
    """

    member_logprobs: list[torch.Tensor]
    member_hidden: list[torch.Tensor] | None
    span_index: torch.Tensor
    contexts: list[str]
    generated: list[str]
    prompt_logppl: torch.Tensor | None = None
    live: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.contexts)


class WeightPolicy(abc.ABC):
    """Maps a PolicyState to weights [B, M]: non-negative, each row summing to 1."""

    needs_hidden: bool = False
    needs_prompt_perplexity: bool = False
    reads_state: bool = True  # False: the same weights whatever the state (members skipped by the gate need not catch up for it)

    def __init__(self, n_members: int):
        self.n_members = n_members

    def bind(self, members: list, union) -> None:
        """Called once by the engine with its members and their `UnionVocab`, before any state:
        a policy that reads more than the state (a learned agent) checks and prepares itself here."""

    @abc.abstractmethod
    def weights(self, state: PolicyState) -> torch.Tensor:
        """[B, M] non-negative weights (normalised by `__call__`)."""

    def __call__(self, state: PolicyState) -> torch.Tensor:
        weights = self.weights(state).float()
        expected = (state.batch_size, self.n_members)
        if tuple(weights.shape) != expected:
            raise ValueError(f"{type(self).__name__} returned weights of shape {tuple(weights.shape)}, expected {expected}")
        if (weights < 0).any() or not torch.isfinite(weights).all() or (weights.sum(-1) <= 0).any():
            raise ValueError(f"{type(self).__name__} returned weights that are negative, not finite, or sum to zero")
        return weights / weights.sum(-1, keepdim=True)


class UniformPolicy(WeightPolicy):
    """Every member weighs the same."""

    reads_state = False

    def weights(self, state: PolicyState) -> torch.Tensor:
        return torch.ones(state.batch_size, self.n_members)


class FixedPolicy(WeightPolicy):
    """The same user-given weights for every row and span."""

    reads_state = False

    def __init__(self, weights: list[float]):
        super().__init__(len(weights))
        self.fixed = torch.tensor(weights, dtype=torch.float32)
        self.fixed /= self.fixed.sum()

    def weights(self, state: PolicyState) -> torch.Tensor:
        return self.fixed.expand(state.batch_size, -1)


class PerplexityPolicy(WeightPolicy):
    """PackLLM-sim (Mavromatis et al., 2024, "Pack of LLMs"): each member weighs by how well it reads
    the prompt, softmax(-log-perplexity / temperature) over the members, one weight vector per prompt.

    PackLLM scores every member on one reference tokenization; here each member reads the prompt in
    its own tokens (no vocabulary mapping), and the log-perplexities come from the forward pass the
    ensemble runs anyway over the prompt. Temperature 1 is PackLLM's.
    """

    needs_prompt_perplexity = True

    def __init__(self, n_members: int, temperature: float = 1.0):
        super().__init__(n_members)
        if not temperature > 0:
            raise ValueError(f"perplexity_temperature={temperature}: it must be > 0")
        self.temperature = temperature

    def weights(self, state: PolicyState) -> torch.Tensor:
        return torch.softmax(-state.prompt_logppl.float() / self.temperature, dim=-1)


def make_policy(weights, n_members: int, perplexity_temperature: float = 1.0) -> WeightPolicy:
    """`weights=uniform`, `weights=perplexity` (PackLLM), or a list of one non-negative number per
    member (`weights=[0.7,0.3]`)."""
    if weights is None or (isinstance(weights, str) and weights.strip().lower() == "uniform"):
        return UniformPolicy(n_members)
    if isinstance(weights, str) and weights.strip().lower() == "perplexity":
        return PerplexityPolicy(n_members, float(perplexity_temperature))
    values = parse_list(weights)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = [math.nan]
    if not all(map(math.isfinite, values)):
        raise ValueError(f"weights={weights!r}: use `uniform`, `perplexity` or a list of finite numbers, one per member, e.g. weights=[0.5,0.5]")
    if len(values) != n_members:
        raise ValueError(f"weights={weights!r} has {len(values)} values but there are {n_members} members: give one weight per member")
    if any(v < 0 for v in values):
        raise ValueError(f"weights={weights!r} has a negative weight: weights must be >= 0")
    if sum(values) <= 0:
        raise ValueError(f"weights={weights!r} sums to zero: at least one member needs a positive weight")
    return FixedPolicy(values)

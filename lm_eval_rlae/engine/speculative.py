"""Speculative decoding of the ensemble: exactly the output of step-by-step decoding, in fewer forwards.

A decoding forward is bound by reading the weights, so a forward over k new tokens costs little
more than over one. A round, for the live rows of a batch:

  1. The drafter (the member with the most weight, the cheapest of those tied) drafts alone, greedy
     in its own vocabulary, one forward per drafted token.
  2. Every other member with weight is fed the drafted tokens exactly as step-by-step decoding
     would feed them (its own ids, re-encodings, re-tokenizations at boundaries: `feeding.queued`),
     all in one forward that returns its distribution before each drafted position.
  3. At each position the ensemble chooses exactly as a plain step does (`Generation.decide`:
     weights, the gate, the UTF-8 guard, min_new_tokens), every position of every row at once. A
     row keeps the drafted tokens up to the first position where the choice differs, and that
     choice (or the choice after the whole draft); members fed past it take those ids back.

So a round verifies `positions` positions per row: the drafted tokens and the ensemble's own after
them. A row's draft ends early where feeding a drafted token would not just append ids to some
member (a re-tokenization that replaces ids fed before), at an end of sequence or a stop string,
and at its goal (the span's end: agents read the state where they always did); the round ends where
the drafter is unsure on every row. The position where a draft ends is still verified, and what the
ensemble chooses there is fed the plain way. So every row's text, tokens and members' ids are those
of step-by-step decoding; only the number of forward passes changes (and float rounding between a
forward over one token and over several, as between batch sizes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lm_eval_rlae.engine.feeding import queued

UNSURE = 0.4  # the drafter's top-1 probability below which its token is often not the ensemble's choice
MAX_POSITIONS = 8
EXPLORE = 16  # decodes before the mode that looks slower is timed again; doubled while it stays slower
MAX_EXPLORE = 256
DECAY = 0.95  # of a mode's time and tokens so far, per decode of that mode: about its last 20 decodes count


@dataclass
class Counts:
    """What the rounds did, for the benchmark: positions verified, those where the ensemble chose the
    drafted token, tokens kept, and (row, round) pairs; and the plain steps taken instead of rounds
    because they measured faster (not those where a single member has weight)."""

    rounds: int = 0
    steps: int = 0
    positions: int = 0
    agreed: int = 0
    tokens: int = 0
    row_rounds: int = 0

    @property
    def acceptance(self) -> float:
        return self.agreed / max(self.positions, 1)

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row keeps per verify pass."""
        return self.tokens / max(self.row_rounds, 1)


class Drafting:
    """Whether to draft, who drafts and how far, per engine, adapted to what the rounds so far did.

    Rounds pay where a forward over several tokens costs little more than over one: at small
    batches. Where a batch's forwards are already bound by compute (large batches on a CPU), a
    verify pass costs nearly as much as the steps it replaces, and drafts taken back are lost work;
    so per number of rows decoding, the seconds per token are measured for rounds and for plain steps (time
    over tokens of each mode's recent decodes: a round that kept one token weighs less than one that
    kept five), and the faster is used; the slower is timed again after 16 decodes, then after twice
    as many each time it is still slower. A member's step cost, to pick the cheapest drafter, is the
    parameters a decoding step reads: all but an input embedding the model does not also use as its
    output head.
    """

    def __init__(self, engine):
        union = engine.union
        self.positions = 4  # positions a round verifies: drafted tokens and the ensemble's own after them
        self.counts = Counts()
        self.unsure = [5, 10]  # positions where the drafter was unsure: [agreed, examined] (a prior of one in two)
        # keyed by the number of rows decoding (`batch` below): what a token costs depends on it
        self.spent: dict[tuple[str, int], tuple[float, float]] = {}  # (mode, rows) -> decayed (seconds, tokens)
        self.faster: dict[int, bool] = {}  # rows -> whether rounds were faster at its last decode
        self.exploration: dict[int, tuple[int, int]] = {}  # rows -> (decodes until the slower mode is timed, gap)
        self.step_cost = [_read_parameters(member.model) for member in engine.members]
        # per member [V_m]: ids the union cannot choose (rows past its tokenizer), and its end-of-sequence ids
        self.sink = [to_union == union.size for to_union in union.to_union]
        self.eos = [to_union == union.eos for to_union in union.to_union]

    def drafter(self, weights: torch.Tensor, live: torch.Tensor, needed: list[int]) -> int:
        """The member with the most weight over the live rows (the ensemble follows it most often), the
        cheapest of those within 5% of it (uniform weights: the cheapest)."""
        held = weights.cpu()[live].sum(0)
        top = max(float(held[m]) for m in needed)
        return min((m for m in needed if held[m] >= 0.95 * top), key=lambda m: self.step_cost[m])

    def per_token(self, mode: str, batch: int) -> float | None:
        """Seconds per token decoded of a mode's recent decodes with this many rows decoding; None before any."""
        seconds, tokens = self.spent.get((mode, batch), (0.0, 0.0))
        return seconds / tokens if tokens else None

    def speculates(self, batch: int) -> bool:
        """Whether the next decode of this many rows is a round (else a plain step): each mode
        tried first, then the one with fewer seconds per token, the slower one timed again after a gap
        that doubles each time (and starts over when the faster mode changes)."""
        rounds, steps = self.per_token("round", batch), self.per_token("step", batch)
        if rounds is None or steps is None:
            return rounds is None
        faster = rounds <= steps
        countdown, gap = self.exploration.get(batch, (EXPLORE, EXPLORE))
        if self.faster.get(batch, faster) != faster:  # the faster mode changed: the other is timed again soon
            countdown, gap = EXPLORE, EXPLORE
        self.faster[batch] = faster
        if countdown == 1:  # time the slower mode once, then wait twice as long
            gap = min(2 * gap, MAX_EXPLORE)
            self.exploration[batch] = (gap, gap)
            return not faster
        self.exploration[batch] = (countdown - 1, gap)
        return faster

    def timed(self, mode: str, batch: int, seconds: float, tokens: int) -> None:
        """Record a decode: its mode, rows decoding, wall time and tokens decoded over its rows."""
        spent, decoded = self.spent.get((mode, batch), (0.0, 0.0))
        self.spent[(mode, batch)] = (DECAY * spent + seconds, DECAY * decoded + tokens)

    def stops_when_unsure(self) -> bool:
        """Whether a round ends where the drafter is unsure on every row: while the ensemble has mostly
        not chosen its unsure tokens so far (it does, where the members agree anyway)."""
        agreed, examined = self.unsure
        return agreed < 0.6 * examined

    def adapt(self, agreed: list[int], verified: list[int], unsure: tuple[int, int]) -> None:
        """Per row of a round: positions where the ensemble chose the draft, positions verified; and of
        the unsure positions, (agreed, examined). Every row agreeing everywhere: one position more next
        round; fewer than half agreeing: one less."""
        if all(a == v for a, v in zip(agreed, verified)):
            self.positions = min(self.positions + 1, MAX_POSITIONS)
        elif sum(agreed) < 0.5 * sum(verified):
            self.positions = max(self.positions - 1, 2)
        self.unsure = [self.unsure[0] + unsure[0], self.unsure[1] + unsure[1]]


def advance(generation, weights: torch.Tensor, goal: list[int]) -> None:
    """Decode every live row of `generation` to its goal (tokens decoded at the span's end) in rounds,
    or in plain steps where a single member has weight (nothing to verify) or where rounds do not pay."""
    drafting = generation.engine.drafting
    while (live := generation.live(goal)).any():
        needed = generation.needed(weights, live)
        if len(needed) < 2:
            generation.step(weights, goal)
            continue
        batch = int(live.sum())  # the rows decoding: what a token costs depends on them (rows done still ride along)
        before = sum(row.steps for row in generation.rows)
        prompts = any(generation.streams[m].cache is None for m in needed)  # a member reads its prompts in this decode
        start = time.perf_counter()
        if drafting.speculates(batch):
            mode = "round"
            _Round(generation, weights, goal, live, needed).run()
        else:
            mode = "step"
            drafting.counts.steps += 1
            generation.step(weights, goal)
        if not prompts:  # reading the prompts would count as decoding time, for whichever mode came first
            drafting.timed(mode, batch, time.perf_counter() - start, sum(row.steps for row in generation.rows) - before)


class _Round:
    def __init__(self, generation, weights, goal, live, needed):
        self.gen, self.weights, self.needed = generation, weights, needed
        self.drafting = generation.engine.drafting
        self.union = generation.union
        self.rows = live.nonzero()[:, 0].tolist()
        self.drafter = self.drafting.drafter(weights, live, needed)
        max_gen = generation.decoding.max_gen_toks
        # the last position each row verifies: the round's length, its goal, max_gen_toks; cut shorter by the draft
        self.ends = {r: min(self.drafting.positions, goal[r] - generation.rows[r].steps, max_gen - generation.rows[r].steps) for r in self.rows}
        self.drafts = {r: [] for r in self.rows}  # union id drafted at each position
        self.sure = {r: [] for r in self.rows}  # whether the drafter was sure of it
        self.texts = {r: [generation.rows[r].text] for r in self.rows}  # text before each position
        # per member that runs: the ids each drafted position appends, and its sync after each position
        self.plans = {m: {r: [] for r in self.rows} for m in needed}
        self.syncs = {m: {r: [generation.rows[r].syncs[m]] for r in self.rows} for m in needed}

    def run(self) -> None:
        dists, states = self._draft()
        read = {self.drafter: (torch.stack(dists, 1), None if states[0] is None else torch.stack(states, 1))}  # [B, P, V]
        read |= self._verify(read[self.drafter][0])
        self._accept(read)

    # ------------------------------------------------------------------ 1. draft

    def _draft(self):
        """The drafter's tokens, position by position, and its distribution before each ([B, V] each)."""
        gen, d = self.gen, self.drafter
        stream = gen.streams[d]
        gen._catch_up([d])
        dists, states = [stream.logprobs], [stream.states]
        to_union = self.union.to_union[d]
        for i in range(1, max(self.ends.values()) + 1):
            active = [r for r in self.rows if i <= self.ends[r]]
            if not active:
                break
            logprobs = dists[-1].masked_fill(self.drafting.sink[d], -torch.inf)
            early = torch.tensor([gen.rows[r].steps + i - 1 < gen.decoding.min_new_tokens for r in range(len(gen.rows))])
            logprobs = logprobs.masked_fill(early[:, None].to(logprobs.device) & self.drafting.eos[d], -torch.inf)
            top = logprobs.max(-1)
            drafted = to_union[top.indices].tolist()
            sure = (top.values.exp() >= UNSURE).tolist()
            if self.drafting.stops_when_unsure() and not any(sure[r] for r in active if i < self.ends[r]):
                for r in active:  # unsure everywhere: verify this position and stop
                    self.ends[r] = i
            feeding = []
            for r in active:
                self.drafts[r].append(drafted[r])
                self.sure[r].append(sure[r])
                if i < self.ends[r] and self._plan(r, i, drafted[r]):
                    feeding.append(r)
            if not feeding:
                break
            stream.feed([self.plans[d][r][i - 1] if r in feeding else [] for r in range(len(gen.rows))])
            dists.append(stream.logprobs)
            states.append(stream.states)
        return dists, states

    def _plan(self, r: int, i: int, token: int) -> bool:
        """Plan feeding the drafted token at position i of row r to every member that runs; False
        (the row's draft ends at i) where it ends the text or would not just append ids."""
        gen = self.gen
        piece = self.union.token_bytes[token]
        text = self.texts[r][-1] + piece
        outcomes = {}
        if token != self.union.eos and not (piece and gen.stopped(text, len(piece))):
            for m in self.needed:
                outcomes[m] = queued(gen.engine.members[m].vocab, self.syncs[m][r][-1], int(self.union.from_union[m][token]), piece)
        if not outcomes or any(drop for drop, _, _ in outcomes.values()):
            self.ends[r] = i
            return False
        for m, (_, add, sync) in outcomes.items():
            self.plans[m][r].append(add)
            self.syncs[m][r].append(sync)
        self.texts[r].append(text)
        return True

    # ------------------------------------------------------------------ 2. verify

    def _verify(self, drafter_dists: torch.Tensor) -> dict:
        """Each other member's distributions before each position [B, P, V_m] (and states), from one
        forward over what it is owed and the draft. With the gate, the first member goes first, and
        the others run only if it is not confident at some position of a row where they have weight."""
        gen, out = self.gen, {}
        lead = drafter_dists if self.drafter == 0 else None
        for m in self.needed:
            if m == self.drafter:
                continue
            if gen.engine.gate is not None and m != 0 and not self._needed_beside_the_lead(m, lead):
                continue
            out[m] = self._feed_draft(m)
            if m == 0:
                lead = out[m][0]
        return out

    def _needed_beside_the_lead(self, m: int, lead: torch.Tensor) -> bool:
        weights = self.weights.cpu()
        confident = self.gen.confident(lead).cpu()  # [B, P]
        return any(weights[r, m] > 0 and not confident[r, : self.ends[r]].all() for r in self.rows)

    def _feed_draft(self, m: int):
        gen = self.gen
        ids, read = [], []
        for r in range(len(gen.rows)):
            owed = gen.pending[m][r]
            if r not in self.ends:
                ids.append(owed)
                read.append([])
                continue
            offsets, row_ids = [len(owed) - 1], list(owed)
            for add in self.plans[m][r][: self.ends[r] - 1]:
                row_ids += add
                offsets.append(len(row_ids) - 1)
            ids.append(row_ids)
            read.append(offsets)
        gen.pending[m] = [[] for _ in gen.rows]
        return gen.streams[m].feed(ids, read)

    # ------------------------------------------------------------------ 3. choose and keep

    def _accept(self, read: dict) -> None:
        gen, union = self.gen, self.union
        pairs = [(r, i) for r in self.rows for i in range(1, self.ends[r] + 1)]  # every position of every row: N
        rows_t = torch.tensor([r for r, _ in pairs])
        before = torch.tensor([i - 1 for _, i in pairs])  # the distribution before each position
        logprobs = [read[m][0][rows_t.to(read[m][0].device), before.to(read[m][0].device)] if m in read else None for m in range(len(gen.streams))]
        chosen, proposer = gen.decide(
            logprobs, self.weights[rows_t.to(self.weights.device)], [self.texts[r][i - 1] for r, i in pairs],
            [gen.rows[r].steps + i - 1 for r, i in pairs],
        )
        own_ids = [back[chosen].tolist() for back in union.from_union]  # M x [N]
        kept, agreed, examined, unsure, first = {}, [], [], [0, 0], 0
        for r in self.rows:
            committed = []  # indices into pairs of the tokens the row goes on after
            for i in range(1, self.ends[r] + 1):
                n = first + i - 1
                token = int(chosen[n])
                goes_on = gen.append(r, token, proposer[n], own_ids[proposer[n]][n])
                same = token == self.drafts[r][i - 1]
                if not self.sure[r][i - 1]:
                    unsure = [unsure[0] + same, unsure[1] + 1]
                if goes_on:
                    committed.append(n)
                if not goes_on or not same or i == self.ends[r]:
                    break
            kept[r] = i - 1  # drafted tokens kept: their ids are in the caches of the members that ran
            agreed.append(kept[r] + same)
            examined.append(i)
            self._rewind(r, kept[r], read)
            for m in range(len(gen.streams)):  # then the plain way: every token to a member that did not run, the last one to the others
                for n in committed if m not in read else committed[kept[r] :]:
                    gen.queue(m, r, own_ids[m][n], union.token_bytes[int(chosen[n])])
            first += self.ends[r]
        self._restore(kept, read)
        counts = self.drafting.counts
        counts.rounds += 1
        counts.row_rounds += len(self.rows)
        counts.positions += sum(examined)
        counts.agreed += sum(agreed)
        counts.tokens += sum(examined)
        self.drafting.adapt(agreed, examined, unsure)

    def _rewind(self, r: int, kept: int, read: dict) -> None:
        """Members that ran keep row r's ids up to the kept drafted tokens, and the sync after them."""
        for m in read:
            self.gen.streams[m].take_back(r, sum(len(add) for add in self.plans[m][r][kept : self.ends[r] - 1]))
            self.gen.rows[r].syncs[m] = self.syncs[m][r][kept]

    def _restore(self, kept: dict, read: dict) -> None:
        """Members that ran get back, in each row of the round, the distribution (and state) after the
        kept tokens: the one before the row's last position."""
        rows = torch.tensor(self.rows)
        index = torch.tensor([kept[r] for r in self.rows])
        for m, (dists, states) in read.items():
            stream = self.gen.streams[m]
            logprobs = stream.logprobs.clone()
            logprobs[rows.to(logprobs.device)] = dists[rows.to(dists.device), index.to(dists.device)]
            stream.logprobs = logprobs
            if states is not None:
                hidden = stream.states.clone()
                hidden[rows.to(hidden.device)] = states[rows.to(states.device), index.to(states.device)]
                stream.states = hidden


def _read_parameters(model: torch.nn.Module) -> int:
    """Parameters a decoding step reads: all but an input embedding that is not also the output head."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight.data_ptr() != head.weight.data_ptr():
        total -= embedding.weight.numel()
    return total

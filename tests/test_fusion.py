"""The fusion engine's own invariants, on the two tiny members of different tokenizer families.
Those that read scores, hidden states and caches run on every device present (`device`)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import text_strategies

from lm_eval_rlae.engine import utf8
from lm_eval_rlae.engine.fusion import Decoding, FusionEngine, Generation, Scored, mixture_logprob
from lm_eval_rlae.engine.members import Member, MemberSpec, MemberStream
from lm_eval_rlae.offline.presets import PRESETS
from lm_eval_rlae.policies import FixedPolicy, PerplexityPolicy, UniformPolicy, WeightPolicy

CONTEXTS = ["Q: 12+7=\nA:", "The quick brown fox", "Hello 你好 🙂 and", "x"]


@pytest.fixture(scope="module")
def members_on(bpe_member, sp_member):
    """device -> the two tiny members on it, loaded once per device."""
    made = {}

    def on(device):
        if device not in made:
            made[device] = [Member(MemberSpec.parse(path, {"device": device})) for path in (bpe_member, sp_member)]
        return made[device]

    return on


@pytest.fixture(scope="module")
def members(members_on):
    return members_on("cpu")


def _generation(members, policy, contexts=CONTEXTS, max_gen_toks=24, span_length=4, **decoding):
    """Decoded to the end, every member then fed what it is owed (a member runs only when read)."""
    engine = FusionEngine(members, policy, span_length=span_length)
    generation = Generation(engine, contexts, Decoding(until=[], max_gen_toks=max_gen_toks, **decoding))
    while not generation.done:
        generation.advance(policy(generation.state()), span_length)
    generation._catch_up()
    return generation


@pytest.mark.parametrize("weights", [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
def test_every_member_holds_the_generated_text(members, weights):
    """Each member's live ids spell its context then exactly the text generated so far."""
    generation = _generation(members, FixedPolicy(weights))
    for member, stream in zip(members, generation.streams):
        for r, (context, row) in enumerate(zip(CONTEXTS, generation.rows)):
            context_bytes = member.vocab.decode_bytes(generation._context_ids(member, context))
            live = member.vocab.decode_bytes(stream.ids[r])
            assert row.tokens, "nothing was generated"
            last = generation.union.token_bytes[row.tokens[-1]]
            # the last piece is fed only if decoding went on after it
            assert live in (context_bytes + row.text, context_bytes + row.text[: len(row.text) - len(last)])


def test_member_fed_foreign_tokens_is_retokenized_at_word_boundaries(members):
    """With the BPE member driving, the SP member's ids for each finished word are its own
    canonical tokens of that word whenever it had to be fed a re-encoding inside the word."""
    generation = _generation(members, FixedPolicy([1.0, 0.0]), max_gen_toks=32)
    sp, union = members[1], generation.union
    resynced = 0
    for r, (context, row) in enumerate(zip(CONTEXTS, generation.rows)):
        words, current = [], []  # finished words, as union ids; a word starts at a whitespace piece
        for token in row.tokens:
            piece = union.token_bytes[token]
            if piece[:1].isspace() and current:
                words.append(current)
                current = []
            current.append(token)
        expected = []
        for word in words:
            own = union.from_union[1][word].tolist()
            if min(own) >= 0:
                expected += own
            else:
                expected += sp.vocab.encode_bytes(b"".join(union.token_bytes[t] for t in word))
                resynced += 1
        n_context = len(generation._context_ids(sp, context))
        assert generation.streams[1].ids[r][n_context : n_context + len(expected)] == expected
    assert resynced > 0, "the scenario never fed the SP member a foreign token; the test proves nothing"


def test_a_foreign_character_is_retokenized_in_the_step_that_completes_it(members):
    """CJK text has no spaces to wait for: the SP member, fed the BPE member's partial-character
    pieces, holds its own canonical tokens for a character from the step that completes it on.
    (Mixed weights, so the text stays UTF-8; the BPE member proposes most tokens.)"""
    engine = FusionEngine(members, FixedPolicy([0.9, 0.1]), span_length=1)
    contexts = ["東京は日本の首都で、", "Hello 你好 🙂 and"]
    generation = Generation(engine, contexts, Decoding(until=[], max_gen_toks=24))
    sp, closed = members[1], 0
    while not generation.done:
        generation.advance(engine.policy(generation.state()), 1)
        generation._catch_up()
        for r, row in enumerate(generation.rows):
            sync = row.syncs[1]
            assert not sync.text or utf8.pending_continuation_bytes(sync.text) or sync.text[-1] < 0x80, "a whole character left open"
            text = row.text
            if text and text[-1] >= 0x80 and not utf8.pending_continuation_bytes(text):
                start = len(text) - 1
                while start > 0 and text[start] & 0xC0 == 0x80:
                    start -= 1
                if start == 0 or text[start - 1] >= 0x80 or text[start - 1] in b" \t\n":  # a run of that character alone
                    closed += 1
                    canonical = sp.vocab.encode_bytes(text[start:])
                    assert generation.streams[1].ids[r][-len(canonical):] == canonical, (r, text[start:])
    assert closed > 0, "no step completed a non-ASCII character; the test proves nothing"


def test_one_member_is_never_retokenized(members):
    generation = _generation(members[:1], UniformPolicy(1))
    union = generation.union
    for r, (context, row) in enumerate(zip(CONTEXTS, generation.rows)):
        n_context = len(generation._context_ids(members[0], context))
        own = union.from_union[0][row.tokens].tolist()
        fed = generation.streams[0].ids[r][n_context:]
        assert fed == own[: len(fed)] and len(fed) >= len(own) - 1


def test_members_pass_their_cache_under_the_name_the_installed_transformers_takes(members):
    """transformers 5.24 renamed forward's `past_key_values` to `cache`: the old name warns, and goes in 5.40."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values")
        generation = _generation(members, UniformPolicy(2), max_gen_toks=4)
        scored = generation.engine.loglikelihood([("The quick brown", " fox")])
    assert generation.steps == 4 and scored[0][0] < 0


class _CountingPolicy(WeightPolicy):
    def __init__(self):
        super().__init__(2)
        self.spans = []

    def weights(self, state):
        self.spans.append(state.span_index.tolist())
        assert len(state.member_logprobs) == 2 and state.member_logprobs[1].shape[0] == state.batch_size
        return torch.ones(state.batch_size, 2)


@pytest.mark.parametrize("span_length", [1, 4, 7])
def test_policy_is_called_once_per_span(members, span_length):
    policy = _CountingPolicy()
    generation = _generation(members, policy, max_gen_toks=12, span_length=span_length)
    assert len(policy.spans) == math.ceil(generation.steps / span_length)
    assert [spans[0] for spans in policy.spans] == list(range(len(policy.spans)))


def test_sampling_is_seeded_and_top_k_1_is_greedy(members):
    greedy = _generation(members, UniformPolicy(2)).texts()
    assert _generation(members, UniformPolicy(2), do_sample=True, temperature=1.0, top_k=1).texts() == greedy
    first = _generation(members, UniformPolicy(2), do_sample=True, temperature=1.5, top_p=0.9).texts()
    again = _generation(members, UniformPolicy(2), do_sample=True, temperature=1.5, top_p=0.9).texts()
    assert first == again
    assert first != greedy


def test_long_context_is_left_truncated_to_the_member_window(bpe_member):
    member = Member(MemberSpec.parse({"pretrained": bpe_member, "max_length": 48}, {"device": "cpu"}))
    context = "one two three four five six seven eight nine ten " * 10
    generation = _generation([member], UniformPolicy(1), contexts=[context], max_gen_toks=16)
    assert generation.streams[0].ids[0][:32] == member.lm.tok_encode(context)[-32:]
    assert generation.steps > 0


def test_chat_is_rendered_by_each_member_with_its_own_template(members):
    from lm_eval_rlae.engine.chat import encode_chat

    messages = [{"role": "user", "content": "What is 2+2?"}]
    context = encode_chat(messages, add_generation_prompt=True)
    generation = _generation(members, UniformPolicy(2), contexts=[context], max_gen_toks=2)
    rendered = [member.lm.apply_chat_template(messages, add_generation_prompt=True) for member in members]
    assert rendered[0] != rendered[1], "the tiny members should have different chat templates"
    for member, text in zip(members, rendered):
        assert generation._context_ids(member, context) == member.lm.tok_encode(text)


def _scored(lengths, logprobs):
    return Scored(np.array(logprobs, dtype=float), np.array(lengths), True, torch.zeros(1), None)


def test_segments_are_cut_where_every_member_has_a_boundary():
    # "abcd": A = [ab][cd], B = [ab][c][d]: segments "ab" and "cd"
    a, b = _scored([2, 2], [-1.0, -2.0]), _scored([2, 1, 1], [-0.5, -1.0, -1.5])
    w = np.array([0.25, 0.75])
    expected = math.log(0.25 * math.exp(-1.0) + 0.75 * math.exp(-0.5)) + math.log(0.25 * math.exp(-2.0) + 0.75 * math.exp(-2.5))
    assert mixture_logprob([a, b], w) == pytest.approx(expected, abs=1e-12)
    # A = [a][bcd], B = [ab][cd]: no common inner boundary, one segment
    a = _scored([1, 3], [-1.0, -2.0])
    assert mixture_logprob([a, b], w) == pytest.approx(math.log(0.25 * math.exp(-3.0) + 0.75 * math.exp(-3.0)), abs=1e-12)
    # one-hot weights give that member's own sum exactly
    assert mixture_logprob([a, b], np.array([0.0, 1.0])) == pytest.approx(-3.0, abs=1e-12)


@pytest.mark.parametrize("kinds", [("bpe", "sp"), ("bpe", "sp", "unigram"), tuple(PRESETS)])
def test_scoring_segments_of_any_text_are_exact_for_one_hot_weights_and_bounded_otherwise(vocabs, kinds):
    """Any (context, continuation), each member's continuation tokens cut as lm-eval's _encode_pair
    cuts them (whole minus context: byte-level tokens end inside characters, and a member may merge
    across the boundary), any log-probs: one-hot weights give that member's own loglikelihood; any
    mixture is finite, <= 0 and, per segment by Jensen, >= the weighted mean of the members'."""
    members = [vocabs[kind] for kind in kinds]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text_strategies.text, text_strategies.text, st.integers(0, 2**32 - 1))
    def check(context, continuation, seed):
        rng = np.random.default_rng(seed)
        scored = []
        for mv in members:
            ids = mv.tokenizer.encode(context + continuation, add_special_tokens=False)
            ids = ids[len(mv.tokenizer.encode(context, add_special_tokens=False)) :]
            logprobs = -rng.exponential(2.0, len(ids))
            lengths = mv.reading_lengths(context + continuation, ids)  # an <unk> spans what it replaced
            scored.append(Scored(logprobs, lengths, greedy=False, decision_logprobs=None, decision_hidden=None))
        totals = np.array([s.token_logprobs.sum() for s in scored])
        for m, total in enumerate(totals):
            assert mixture_logprob(scored, np.eye(len(members))[m]) == pytest.approx(total, abs=1e-9)
        weights = rng.dirichlet(np.ones(len(members)))
        mixed = mixture_logprob(scored, weights)
        assert math.isfinite(mixed) and weights @ totals - 1e-9 <= mixed <= 1e-12

    check()


def test_mixed_vocabularies_never_break_a_character(members):
    """Uniform over two tokenizer families: the bytes stay UTF-8 (only the last character may be
    cut by max_gen_toks), although each tiny member alone emits broken bytes freely."""
    from lm_eval_rlae.engine.utf8 import pending_continuation_bytes

    alone = _generation(members[:1], UniformPolicy(1), max_gen_toks=32)
    assert any(_invalid_inside(row.text) for row in alone.rows), "the scenario needs a member that breaks characters"
    mixed = _generation(members, UniformPolicy(2), max_gen_toks=32)
    for row in mixed.rows:
        assert not _invalid_inside(row.text), row.text
        assert pending_continuation_bytes(row.text) == 0 or len(row.tokens) == 32


def _invalid_inside(text: bytes) -> bool:
    """Whether text is not UTF-8, apart from a last character left unfinished."""
    try:
        text.decode("utf-8")
        return False
    except UnicodeDecodeError as error:
        return not (error.reason == "unexpected end of data" and error.end == len(text))


class _HiddenStatePolicy(WeightPolicy):
    """Checks the final hidden states it is given: one [B, H_m] per member, the same vector for the
    same text whichever path (generation or scoring) computed it."""

    needs_hidden = True

    def __init__(self, members):
        super().__init__(len(members))
        self.sizes = [member.model.config.hidden_size for member in members]
        self.seen = []

    def weights(self, state):
        assert [tuple(h.shape) for h in state.member_hidden] == [(state.batch_size, size) for size in self.sizes]
        self.seen.append(state.member_hidden)
        return torch.ones(state.batch_size, self.n_members)


def test_policies_can_read_final_hidden_states(members_on, device):
    members = members_on(device)
    policy = _HiddenStatePolicy(members)
    engine = FusionEngine(members, policy)
    engine.generate(["The quick brown fox"], Decoding(until=[], max_gen_toks=4))
    at_prompt = policy.seen[0]
    engine.loglikelihood([("The quick brown fox", " jumps")])
    at_context_end = policy.seen[-1]
    for generated, scored in zip(at_prompt, at_context_end):
        torch.testing.assert_close(generated, scored, atol=1e-4, rtol=1e-4)


class _RecordingPerplexity(PerplexityPolicy):
    def __init__(self, n_members, temperature=1.0):
        super().__init__(n_members, temperature)
        self.seen = []  # (prompt log-perplexities [B, M], weights [B, M])

    def weights(self, state):
        weights = super().weights(state)
        self.seen.append((state.prompt_logppl, weights))
        return weights


@torch.no_grad()
def _logppl(member, text: str) -> float:
    """Mean -log p of the member's tokens of `text` after the first, from one plain forward over them."""
    ids = torch.tensor([member.lm.tok_encode(text)], device=member.device)
    logprobs = member.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(-logprobs.gather(-1, ids[0, 1:, None]).mean())


def test_perplexity_weights_are_packllm_of_each_members_own_perplexity(members_on, device):
    """`weights=perplexity`: softmax(-log-perplexity / T) of each member's own reading of the prompt,
    taken from the forward pass the engine runs anyway, the same when generating and when scoring,
    rows of different lengths in one batch."""
    members = members_on(device)
    prompts = ["The quick brown fox", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12"]
    expected = torch.tensor([[_logppl(member, prompt) for member in members] for prompt in prompts])  # [B, M]
    policy = _RecordingPerplexity(len(members), temperature=0.5)
    engine = FusionEngine(members, policy)
    engine.generate(prompts, Decoding(until=[], max_gen_toks=6))
    engine.loglikelihood([(prompt, " jumps") for prompt in prompts])
    assert len(policy.seen) == 3  # two spans of generation, one scoring batch
    for logppl, weights in policy.seen:
        torch.testing.assert_close(logppl.cpu(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(weights.cpu(), torch.softmax(-expected / 0.5, -1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(policy.seen[0][1][0], policy.seen[0][1][1])  # the prompts get different weights


def test_perplexity_of_a_head_it_cannot_read_is_refused(bpe_member):
    """A member whose logits are not its output head's (an architecture's own logit scaling) is
    refused, not given wrong perplexities."""
    member = Member(MemberSpec.parse(bpe_member, {"device": "cpu"}))
    member.model.config.final_logit_softcapping = 0.5  # read by the check, ignored by Llama's forward
    with pytest.raises(ValueError, match="beyond its output head"):
        FusionEngine([member, member], PerplexityPolicy(2)).loglikelihood([("The quick brown fox", " jumps")])


def test_members_the_gate_skipped_catch_up_exactly(members_on, device, monkeypatch):
    """With the confidence gate, the second member skips the steps the first decides alone and later
    catches up on them in one forward: its cache then reads every token as if fed one by one."""
    members = members_on(device)
    forwards = {member.name: 0 for member in members}
    for member in members:
        original = member.forward

        def counted(*args, _original=original, _name=member.name, **kwargs):
            forwards[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(member, "forward", counted)
    prompts = ["The quick brown fox", "Numbers: 1 2 3", "Once upon a time"]
    engine = FusionEngine(members, UniformPolicy(2), gate=0.15, speculative=False)  # step by step (speculative: test_speculative.py)
    generation = Generation(engine, prompts, Decoding(until=[], max_gen_toks=24))
    while not generation.done:
        generation.advance(engine.policy(generation.state()), engine.span_length)
    lead, other = (forwards[member.name] for member in members)
    assert 1 < other < lead  # the gate skipped some steps, and the skipped member caught up
    generation._catch_up()
    for member, stream in zip(members, generation.streams):
        fresh = MemberStream(member, len(prompts))
        fresh.feed(stream.ids)  # every live token of each row at once
        torch.testing.assert_close(stream.logprobs, fresh.logprobs, atol=1e-4, rtol=1e-4)


def test_gate_is_checked_before_any_model_loads():
    from lm_eval_rlae.lm import RLAELM

    for gate in (1.0, -0.1, "high"):
        with pytest.raises(ValueError, match="probability in \\[0, 1\\)"):
            RLAELM(members="[no-such-model-anywhere]", gate=gate)


# ----------------------------------------------------------------------------- three families, <unk>


@pytest.fixture(scope="module")
def three(members, unigram_member):
    """bpe, sp and the Unigram member, which has no byte fallback: what it cannot spell is `<unk>`."""
    return [*members, Member(MemberSpec.parse(unigram_member, {"device": "cpu"}))]


def _known(vocab, text: bytes) -> bytes:
    """The characters of text the Unigram member has pieces for (it reads the others as `<unk>`)."""
    known = {c for i, b in enumerate(vocab.token_bytes) if not vocab.is_special[i] for c in b.decode("utf-8")}
    return "".join(c for c in text.decode("utf-8", errors="ignore") if c in known).encode("utf-8")


def test_three_families_keep_the_text_utf8_and_the_unigram_member_reads_unk_where_it_cannot_spell(three):
    """Uniform over three vocabularies: the text stays UTF-8 (each pair of families could break a
    character), `<unk>` is never chosen (it is no text), and the Unigram member, fed characters the
    others chose that it has no piece for, reads them as its own tokenizer does: `<unk>`."""
    contexts = [*CONTEXTS, "東京は日本の首都で、", "Say hello in Chinese: 你好"]
    generation = _generation(three, UniformPolicy(3), contexts=contexts, max_gen_toks=32)
    generation._catch_up()
    unigram, stream = three[2], generation.streams[2]
    unk, unknown_read = unigram.vocab.unk_id, 0
    for r, (context, row) in enumerate(zip(contexts, generation.rows)):
        assert not _invalid_inside(row.text), row.text
        assert not set(row.tokens) & set(generation.union.unknown.tolist()), "a <unk> was chosen as text"
        n_context = len(generation._context_ids(unigram, context))
        fed = stream.ids[r][n_context:]
        spelt = unigram.vocab.decode_bytes(fed)
        assert spelt in (_known(unigram.vocab, row.text), _known(unigram.vocab, row.text[: -len(generation.union.token_bytes[row.tokens[-1]])]))
        if unk in fed:
            unknown_read += 1
            assert _known(unigram.vocab, row.text) != row.text  # only where the text has characters it cannot spell
    assert unknown_read > 0, "no row had a character the Unigram member cannot spell: the test proves nothing"


def test_a_continuation_the_unigram_member_reads_as_unk_is_mixed_over_the_characters_unk_replaced(three):
    """Scoring cuts a continuation where every member has a token boundary: the Unigram member's
    `<unk>` must span the characters it replaced (" 你好 👋!": [▁][<unk>: 你好][▁][<unk>: 👋][!]), so
    the segments are those characters for every member, and the mixture is taken over them."""
    bpe, _, unigram = three
    engine = FusionEngine([bpe, unigram], FixedPolicy([0.5, 0.5]))
    request = ("Pick the greeting:\nAnswer:", " 你好 👋!")
    scored_bpe, scored_unigram = (per_member[0] for per_member in engine.score([request]))
    assert unigram.tokenizer.convert_ids_to_tokens(unigram.lm._encode_pair(*request)[1]) == ["▁", "<unk>", "▁", "<unk>", "!"]
    assert scored_unigram.token_lengths.tolist() == [1, 6, 1, 4, 1]
    ends = np.cumsum(scored_bpe.token_lengths)  # the byte-level member's own boundaries
    assert ends[-1] == len(request[1].encode())
    segments = np.searchsorted([1, 7, 8, 12, 13], ends, side="left")  # its tokens, by the unigram member's segments
    bpe_segments = np.bincount(segments, weights=scored_bpe.token_logprobs, minlength=5)
    expected = np.logaddexp(np.log(0.5) + bpe_segments, np.log(0.5) + scored_unigram.token_logprobs).sum()
    assert engine.loglikelihood([request])[0][0] == pytest.approx(expected, abs=1e-9)

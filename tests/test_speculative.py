"""Speculative decoding is lossless: drafted-and-verified generation gives exactly the plain engine's
union tokens, texts and members' ids, on the tiny members of two tokenizer families and of three
(byte-level BPE, byte-fallback SentencePiece, Unigram with `<unk>`), for every kind of weighting and
every case where feeding a draft is not just appending (re-encodings, re-tokenized words and
characters, byte fallback, `<unk>`, CJK, emoji, stops, ends of sequence, sliding windows), at batch 1 and 8.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import text_strategies
import tiny_models
from lm_eval_rlae.engine.fusion import Decoding, FusionEngine, Generation
from lm_eval_rlae.engine.members import Member, MemberSpec, MemberStream
from lm_eval_rlae.engine.speculative import Drafting
from lm_eval_rlae.policies import FixedPolicy, PerplexityPolicy, UniformPolicy, WeightPolicy
from lm_eval_rlae.policies.agent import AgentPolicy, AgentSpec
from lm_eval_rlae.policies.state import make_state_features

CONTEXTS = [
    "Q: 12+7=\nA:",
    "The quick brown fox",
    "Hello 你好 🙂 and",
    "x",
    "東京は日本の首都で、",
    "Prices: $3.50, $12.99",
    "Once upon a time, there was",
    "\t\t  ünïcödé  ",
]


@pytest.fixture(autouse=True)
def always_rounds(monkeypatch):
    """Every decode a round where two members have weight: the engine would otherwise pick rounds or
    plain steps by their measured speed (tested alone below), and the rounds must be exercised."""
    monkeypatch.setattr(Drafting, "speculates", lambda self, batch: True)


def _member(path) -> Member:
    return Member(MemberSpec.parse(str(path), {"device": "cpu"}))


@pytest.fixture(scope="module")
def members(bpe_member, sp_member):
    return [_member(bpe_member), _member(sp_member)]


@pytest.fixture(scope="module")
def three(members, unigram_member):
    """bpe, sp and the Unigram member without byte fallback: characters it has no piece for (CJK,
    emoji, tabs) it reads as `<unk>`, and it cannot read a character's bytes before the whole character."""
    return [*members, _member(unigram_member)]


@pytest.fixture(scope="module")
def sliding(sp_sliding_member):
    return _member(sp_sliding_member)


def _generate(members, policy, speculative, contexts=CONTEXTS, batch=8, span_length=4, gate=None, **decoding):
    """Every context through the engine `batch` at a time as `FusionEngine.generate` drives it; per
    row its union tokens, its text, and each member's generated ids (after its prompt) once caught up."""
    engine = FusionEngine(members, policy, span_length=span_length, gate=gate, speculative=speculative)
    decoding = Decoding(**({"until": [], "max_gen_toks": 20} | decoding))
    out = []
    for start in range(0, len(contexts), batch):
        generation = Generation(engine, contexts[start : start + batch], decoding)
        prompts = [[len(ids) for ids in pending] for pending in generation.pending]  # M x [B]: owed before anything runs
        span = span_length if policy.reads_state else decoding.max_gen_toks
        while not generation.done:
            generation.advance(policy(generation.state()), span)
        generation._catch_up(range(len(members)))
        texts = generation.texts()
        for r, row in enumerate(generation.rows):
            out.append((row.tokens, texts[r], [stream.ids[r][prompts[m][r] :] for m, stream in enumerate(generation.streams)]))
    return out, engine.drafting.counts


def compare(members, policy, **kwargs):
    """The two paths agree row by row; returns the speculative path's counts and rows."""
    plain, _ = _generate(members, policy, speculative=False, **kwargs)
    drafted, counts = _generate(members, policy, speculative=True, **kwargs)
    for r, ((tokens, text, ids), (got_tokens, got_text, got_ids)) in enumerate(zip(plain, drafted)):
        assert got_tokens == tokens, f"row {r}: union tokens differ"
        assert got_text == text, f"row {r}: {got_text!r} != {text!r}"
        assert got_ids == ids, f"row {r}: a member was fed other ids"
    return counts, drafted


def assert_lossless(members, policy, **kwargs):
    """The two paths agree row by row; returns the speculative path's counts."""
    return compare(members, policy, **kwargs)[0]


class _ReadingPolicy(WeightPolicy):
    """Reads the state (hidden states included) and routes: each span's weights follow the members'
    confidence, so they change from span to span and row to row, zeros included."""

    needs_hidden = True

    def weights(self, state):
        top = torch.stack([lp.max(-1).values.exp() for lp in state.member_logprobs], -1).cpu()  # [B, M]
        assert all(h.shape[0] == state.batch_size for h in state.member_hidden)
        return torch.where(top > 0.5, top, torch.zeros_like(top)) + (top.max(-1, keepdim=True).values <= 0.5) * torch.ones_like(top)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.8, 0.2], [0.2, 0.8], [1.0, 0.0], [0.0, 1.0]])
def test_fixed_weights_are_lossless(members, weights, batch):
    counts = assert_lossless(members, FixedPolicy(weights), batch=batch)
    assert (counts.rounds > 0) == (0 not in weights), "two members with weight: drafts are verified; one: nothing to verify"


@pytest.mark.parametrize("batch", [1, 8])
def test_policies_that_read_the_state_are_lossless(members, batch):
    """State read at every span's end (hidden states, span index): drafts end at spans, zero weights
    make members catch up when a later span needs them."""
    assert assert_lossless(members, _ReadingPolicy(2), batch=batch, span_length=3).rounds > 0
    assert_lossless(members, PerplexityPolicy(2, temperature=0.3), batch=batch)


def test_an_agent_is_lossless(members):
    engine = FusionEngine(members, UniformPolicy(2))
    features = make_state_features("members", members, engine.union)
    torch.manual_seed(0)
    spec = AgentSpec(
        algorithm="mappo", members=[m.name for m in members], vocab_fingerprints=[m.vocab.fingerprint for m in members],
        state="members", layout=features.layout, span_length=2,
    )
    agent = AgentPolicy(spec, spec.build_actor(), features=features)
    assert assert_lossless(members, agent, span_length=2).rounds > 0


@pytest.mark.parametrize("gate", [0.15, 0.6])
def test_the_gate_is_lossless(members, gate):
    assert_lossless(members, UniformPolicy(2), gate=gate)


def test_one_member_and_copies_are_lossless(members):
    bpe = members[0]
    assert_lossless([bpe], UniformPolicy(1))
    counts = assert_lossless([bpe, bpe], UniformPolicy(2))
    assert counts.acceptance > 0.95, "copies agree with themselves but for float rounding"


def test_stops_ends_of_sequence_and_min_new_tokens_are_lossless(members):
    """Rows that stop at different steps: stop strings, the tiny bpe member's early end of sequence
    (corpus lines end at once), held back before min_new_tokens."""
    lines = tiny_models.corpus_lines()[:8]
    assert_lossless(members, FixedPolicy([0.7, 0.3]), contexts=lines, until=["\n", "."], max_gen_toks=16)
    assert_lossless(members, FixedPolicy([0.7, 0.3]), contexts=lines, until=["@@"], max_gen_toks=16, min_new_tokens=10)


def test_sliding_window_members_are_lossless(bpe_member, sliding):
    """An 8-token sliding window, with prompts far longer than it in one batch: taken-back drafts and
    rows fed different numbers of ids leave masked slots, which the window must not count."""
    from test_equality_hf import SLIDING_PROMPTS

    bpe = _member(bpe_member)
    assert_lossless([bpe, sliding], UniformPolicy(2), contexts=SLIDING_PROMPTS, max_gen_toks=16)
    assert_lossless([sliding, sliding], UniformPolicy(2), contexts=SLIDING_PROMPTS, max_gen_toks=16)


def test_sliding_windows_count_a_rows_own_tokens_whatever_the_masked_slots(bpe_member, sliding):
    """After mixed generation (re-encodings taken back, drafts taken back, rows of different widths),
    each row of the sliding-window member reads as the member reads that row's ids alone."""
    from test_equality_hf import SLIDING_PROMPTS

    engine = FusionEngine([_member(bpe_member), sliding], UniformPolicy(2), speculative=True)
    generation = Generation(engine, SLIDING_PROMPTS, Decoding(until=[], max_gen_toks=16))
    generation.advance(torch.full((len(SLIDING_PROMPTS), 2), 0.5), 16)
    generation._catch_up([1])
    stream = generation.streams[1]
    assert (stream.mask == 0).any(), "no masked slot: the test proves nothing"
    for r, ids in enumerate(stream.ids):
        alone = MemberStream(sliding, 1)  # transformers' own sliding-window cache, no masked slot
        alone.feed([ids])
        torch.testing.assert_close(stream.logprobs[r], alone.logprobs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_sliding_window_masks_are_the_ones_transformers_builds(bpe_member, sliding, implementation, monkeypatch):
    """The sliding-window masks built in a few tensor ops are, element for element, those transformers
    builds through vmap from the same condition, in the form each attention implementation reads."""
    from test_equality_hf import SLIDING_PROMPTS
    from transformers.masking_utils import create_causal_mask

    monkeypatch.setattr(sliding.model.config, "_attn_implementation", implementation)
    built = Member._window_masks
    compared = []

    def compare(self, input_ids, attention_mask, position_ids, slot_positions, cache):
        masks = built(self, input_ids, attention_mask, position_ids, slot_positions, cache)
        config = self.model.config.get_text_config()

        def in_window(batch_idx, head_idx, q_idx, kv_idx):
            return slot_positions[batch_idx, kv_idx] > slot_positions[batch_idx, q_idx] - config.sliding_window

        shape = torch.empty(*input_ids.shape, 0, dtype=self.model.dtype)
        expected = create_causal_mask(config, shape, attention_mask, cache, position_ids, and_mask_function=in_window)
        full = create_causal_mask(config, shape, attention_mask, cache, position_ids)
        assert torch.equal(masks["sliding_attention"], expected)
        compared.append(full is not None and full.shape == expected.shape and not torch.equal(full, expected))  # the window cut something
        return masks

    monkeypatch.setattr(Member, "_window_masks", compare)
    engine = FusionEngine([_member(bpe_member), sliding], UniformPolicy(2), speculative=True)
    engine.generate(SLIDING_PROMPTS, Decoding(until=[], max_gen_toks=8))
    assert any(compared), "no mask where the window excludes a slot: the test proves nothing"


def test_members_without_weight_do_not_run(members, monkeypatch):
    """One-hot weights: the other member is not run at all, not even on its prompt; a policy that
    reads the state brings it up to date in one forward."""
    calls = []
    monkeypatch.setattr(members[1], "forward", lambda *a, **k: calls.append(1) or pytest.fail("member 1 ran"))
    engine = FusionEngine(members, FixedPolicy([1.0, 0.0]), speculative=True)
    engine.generate(CONTEXTS[:4], Decoding(until=[], max_gen_toks=8))
    assert not calls


def test_drafts_save_the_verifiers_forwards(members, bpe_member, monkeypatch):
    """Copies agree: the verifier runs about once per round of several tokens, not once per token."""
    bpe, copy = members[0], _member(bpe_member)
    forwards = []
    original = copy.forward
    monkeypatch.setattr(copy, "forward", lambda *a, **k: forwards.append(1) or original(*a, **k))
    engine = FusionEngine([bpe, copy], UniformPolicy(2), speculative=True)
    engine.generate(CONTEXTS[:2], Decoding(until=[], max_gen_toks=24))
    assert len(forwards) <= 1 + 24 // 3, len(forwards)
    assert engine.drafting.counts.tokens_per_round > 3


def test_rounds_are_used_where_they_are_faster_per_token(members, monkeypatch):
    """Per batch size: a round, then a plain step, then the faster per token (time over tokens of the
    recent decodes), the slower timed again after 16 decodes, then 32, 64..., afresh when the faster changes."""
    monkeypatch.undo()  # the real choice
    drafting = FusionEngine(members, UniformPolicy(2)).drafting
    assert drafting.speculates(8)  # nothing timed yet: a round first
    drafting.timed("round", 8, seconds=1.0, tokens=20)  # 0.05 s per token
    assert not drafting.speculates(8)  # then a plain step
    drafting.timed("step", 8, seconds=0.4, tokens=8)  # 0.05 s: a tie goes to rounds
    assert drafting.speculates(8)
    drafting.timed("round", 8, seconds=0.3, tokens=1)  # a round that kept one token: 1.25 s over 20 tokens (decayed), 0.0625 s per token
    choices = [drafting.speculates(8) for _ in range(60)]  # decodes 4 to 63, steps faster from decode 4
    assert [i + 4 for i, chosen in enumerate(choices) if chosen] == [19, 51]
    drafting.timed("round", 8, seconds=0.1, tokens=20)  # rounds now faster: steps timed again 16 decodes on
    choices = [drafting.speculates(8) for _ in range(20)]
    assert [i for i, chosen in enumerate(choices) if not chosen] == [15]
    assert drafting.speculates(1)  # another batch size starts afresh


def test_sampling_goes_step_by_step(members):
    engine = FusionEngine(members, UniformPolicy(2), speculative=True)
    engine.generate(CONTEXTS[:2], Decoding(until=[], max_gen_toks=8, do_sample=True, temperature=1.0))
    assert engine.drafting.counts.rounds == 0


# More characters the Unigram member cannot spell (CJK, emoji; tabs above), which the other two spell
# in bytes, so drafts cut such characters in the middle.
THREE_CONTEXTS = [*CONTEXTS, "Say hello in Chinese: 你好", "Emoji 🙂🙂 and 👋 then", "日本語の文"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("weights", [[1, 1, 1], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2], [0.3, 0.0, 0.7]])
def test_three_families_are_lossless(three, weights, batch):
    """Three vocabularies, `<unk>` included: the Unigram member drafts (most weight) or verifies, is
    fed characters it cannot spell as `<unk>` once whole, and its `<unk>` is never chosen as text."""
    counts, rows = compare(three, FixedPolicy(weights), contexts=THREE_CONTEXTS, batch=batch, max_gen_toks=24)
    assert counts.rounds > 0
    unk = three[2].vocab.unk_id
    assert any(unk in ids[2] for _, _, ids in rows), "the Unigram member was never fed <unk>: the test proves nothing"
    assert not any(set(tokens) & set(FusionEngine(three, UniformPolicy(3)).union.unknown.tolist()) for tokens, _, _ in rows)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("hot", [0, 1, 2])
def test_one_hot_weights_on_each_of_three_families_are_lossless(three, hot, batch):
    weights = [1.0 if m == hot else 0.0 for m in range(3)]
    counts = assert_lossless(three, FixedPolicy(weights), contexts=THREE_CONTEXTS, batch=batch, max_gen_toks=24)
    assert counts.rounds == 0, "one member with weight: nothing to verify"


@pytest.mark.parametrize("batch", [1, 8])
def test_three_families_with_a_policy_that_reads_the_state_and_the_gate_are_lossless(three, batch):
    """Weights that change per span and row, zeros included (members catching up on `<unk>` reads), and the gate."""
    assert assert_lossless(three, _ReadingPolicy(3), contexts=THREE_CONTEXTS, batch=batch, span_length=3, max_gen_toks=18).rounds > 0
    assert_lossless(three, UniformPolicy(3), contexts=THREE_CONTEXTS, batch=batch, gate=0.3, max_gen_toks=18)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    contexts=st.lists(text_strategies.text, min_size=1, max_size=4),
    weights=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]), min_size=2, max_size=2).filter(any),
    span_length=st.integers(1, 5),
)
def test_any_prompts_and_weights_are_lossless(members, contexts, weights, span_length):
    assert_lossless(members, FixedPolicy(weights), contexts=contexts, span_length=span_length, max_gen_toks=10)


def test_speculative_is_the_model_argument_and_on_by_default(bpe_member, sp_member):
    from lm_eval_rlae.lm import RLAELM

    assert RLAELM(members=[bpe_member, sp_member], device="cpu").engine.speculative  # auto: rounds where they measure faster
    assert RLAELM(members=[bpe_member, sp_member], device="cpu", speculative="true").engine.speculative
    assert not RLAELM(members=[bpe_member, sp_member], device="cpu", speculative="false").engine.speculative
    with pytest.raises(ValueError, match="speculative='maybe': give true or false"):
        RLAELM(members="[no-such-model-anywhere]", speculative="maybe")

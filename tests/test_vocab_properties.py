"""Property tests of the byte-exact vocabularies (`lm_eval_rlae.engine.vocab`) on the three tiny
tokenizer families (byte-level BPE, SentencePiece BPE with byte fallback, SentencePiece Unigram
without it, whose unknown characters are `<unk>`) and on the real presets' own tokenizers (SmolLM2's
byte-level BPE, Gemma 3's SentencePiece-style BPE with byte fallback; skipped when `make models` has
not converted them).

MemberVocab: every id maps to the exact bytes it adds to the text; any byte string (partial UTF-8
included) can be fed to a member; the text of any ids is what the member's own decoder (hf's
tok_decode) makes of them; a member without byte fallback reads what it cannot spell as its own
tokenizer does (`<unk>`, which stands for no bytes). UnionVocab: every member token has a union id
with identical bytes and a way back, so any member's tokens reach every other member as it reads
them; all end-of-sequence tokens are one union id.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import text_strategies
from lm_eval_rlae.engine import utf8
from lm_eval_rlae.offline.presets import PRESETS

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = ["bpe", "sp", "unigram"]
UNK = ["unigram"]  # no byte fallback: a character outside its pieces is <unk>
REAL = list(PRESETS)  # the presets' tokenizers, read from their converted directories
KINDS = TINY + REAL
PAD_ROWS = 13  # extra logit rows past the tokenizer, as models with padded embeddings have


def _text_for(kind: str, t: str) -> str:
    # SentencePiece's normalizer maps a literal U+2581 to a space (Gemma does the same): such text
    # is not representable byte-exactly by that member's canonical tokens.
    return t.replace("▁", "_") if kind in ("sp", "unigram", "gemma3-270m") else t


def _reading(kind: str, mv, data: bytes) -> bytes:
    """The bytes of `data` a member reads, by definition: all but the bytes no token contains; for a
    member without byte fallback, the whole characters of its pieces and nothing else (a character
    outside them is `<unk>`, and a broken character's bytes have no token)."""
    if kind not in UNK:
        return data.translate(None, mv.unspellable_bytes)
    known = {c for i, b in enumerate(mv.token_bytes) if not mv.is_special[i] for c in b.decode("utf-8")}
    return "".join(c for c in data.decode("utf-8", errors="ignore") if c in known).encode("utf-8")


@pytest.fixture(scope="module")
def padded_vocabs(tokenizers):
    from lm_eval_rlae.engine.vocab import MemberVocab

    return {k: MemberVocab.from_tokenizer(tokenizers[k], vocab_size=len(tokenizers[k]) + PAD_ROWS) for k in TINY}


@pytest.fixture(scope="module", params=["tiny", "tiny-padded", "real"])
def union(request, vocabs, padded_vocabs):
    """(union, its member vocabularies, their kinds)"""
    from lm_eval_rlae.engine.vocab import UnionVocab

    kinds = {"tiny": TINY, "tiny-padded": TINY[:2], "real": REAL}[request.param]  # padding: the pair is enough
    members = [(padded_vocabs if request.param == "tiny-padded" else vocabs)[k] for k in kinds]
    return UnionVocab(members), members, kinds


# ------------------------------------------------------------------------------- MemberVocab


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_ids_map_to_the_exact_text_bytes(tokenizers, vocabs, kind):
    tok, mv = tokenizers[kind], vocabs[kind]

    @PROPERTY
    @given(text_strategies.text)
    def check(t):
        t = _text_for(kind, t)
        ids = tok.encode(t, add_special_tokens=False)
        assert b"".join(mv.token_bytes[i] for i in ids) == _reading(kind, mv, t.encode("utf-8"))

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_encode_bytes_is_byte_exact_for_any_bytes(vocabs, padded_vocabs, kind):
    for mv in (vocabs[kind], *([padded_vocabs[kind]] if kind in TINY else [])):

        @PROPERTY
        @given(text_strategies.any_bytes)
        def check(data):
            ids = mv.encode_bytes(data)
            assert all(isinstance(i, int) and 0 <= i < len(mv.token_bytes) for i in ids)
            assert b"".join(mv.token_bytes[i] for i in ids) == _reading(kind, mv, data)
            assert not any(mv.is_special[i] and i != mv.unk_id for i in ids), "encode_bytes must not produce special tokens but <unk>"

        check()


@pytest.mark.parametrize("kind", KINDS)
def test_encode_bytes_gives_the_canonical_tokens_of_valid_text(tokenizers, vocabs, kind):
    """On valid UTF-8 the re-encoding is the member's own tokenization (what re-sync relies on)."""
    tok, mv = tokenizers[kind], vocabs[kind]

    @PROPERTY
    @given(text_strategies.text)
    def check(t):
        t = _text_for(kind, t)
        assert mv.encode_bytes(t.encode("utf-8")) == tok.encode(t, add_special_tokens=False)

    check()


def _ids(vocab):
    """Any ids a member can generate (all but end-of-sequence), weighted towards those that make
    partial UTF-8 and drop out of text: byte-fallback, multi-byte fragments, special tokens."""
    everything = [i for i in range(len(vocab.tokenizer)) if i not in vocab.eos_ids]
    awkward = [
        i for i in everything
        if vocab.is_byte_fallback[i] or vocab.is_special[i] or not utf8.is_valid_prefix(vocab.token_bytes[i])
        or utf8.leading_continuation_bytes(vocab.token_bytes[i])
    ]
    return st.lists(st.one_of(st.sampled_from(everything), st.sampled_from(awkward)), max_size=16)


@pytest.mark.parametrize("kind", KINDS)
def test_the_text_of_any_ids_is_what_the_members_own_decoder_makes_of_them(tokenizers, vocabs, kind):
    """A member generating alone gives hf's text: `tok_decode` (skip_special_tokens) of its ids,
    broken characters and byte-fallback runs included, from the pieces `Generation` keeps."""
    tok, mv = tokenizers[kind], vocabs[kind]

    @PROPERTY
    @given(_ids(mv))
    def check(ids):
        assert utf8.decode([piece for i in ids if (piece := mv.text_piece(i))]) == tok.decode(ids, skip_special_tokens=True)

    check()


def test_bytes_no_token_contains_are_dropped_as_the_members_own_tokenizer_drops_them(caplog):
    """A byte-level BPE trained without the full byte alphabet (as SmolLM2's) cannot spell every
    byte: it reads text without those bytes, once warned, rather than failing a generation."""
    import tiny_models
    from lm_eval_rlae.engine.vocab import MemberVocab

    tok = tiny_models.build_bpe_tokenizer(full_alphabet=False)  # its corpus is ASCII
    mv = MemberVocab.from_tokenizer(tok, vocab_size=None)
    assert set(mv.unspellable_bytes) >= set(range(0x80, 0x100)) and ord("a") not in mv.unspellable_bytes
    assert mv.encode_bytes("aéb 你".encode()) == tok.encode("aéb 你", add_special_tokens=False) == tok.encode("ab ", add_special_tokens=False)
    assert mv.decode_bytes(mv.encode_bytes(b"Q\xff\xff: 1")) == b"Q: 1"
    assert sum("has no token for byte 0xff" in r.getMessage() for r in caplog.records) == 1

    @PROPERTY
    @given(text_strategies.any_bytes)
    def check(data):
        assert mv.decode_bytes(mv.encode_bytes(data)) == data.translate(None, mv.unspellable_bytes)

    check()


@pytest.mark.parametrize("kind", TINY)
def test_special_tokens_stand_for_no_text(tokenizers, vocabs, kind):
    tok, mv = tokenizers[kind], vocabs[kind]
    assert len(mv.token_bytes) == len(mv.is_special) == len(tok)
    names = {"bpe": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             "sp": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
             "unigram": ["<pad>", "</s>", "<s>", "<unk>"]}[kind]
    for name in names:
        i = tok.convert_tokens_to_ids(name)
        assert mv.is_special[i], name
        assert mv.token_bytes[i] == b"", name
    assert tok.eos_token_id in mv.eos_ids
    assert all(mv.is_special[i] for i in mv.eos_ids)
    special_ids = {tok.convert_tokens_to_ids(n) for n in names}
    for piece, i in tok.get_vocab().items():
        if i not in special_ids:
            assert not mv.is_special[i], piece
            assert mv.token_bytes[i], f"regular token {piece!r} stands for no bytes"


def test_token_bytes_of_both_families(tokenizers, vocabs):
    bpe, sp = tokenizers["bpe"], tokenizers["sp"]
    # byte-level: "Ġ" is a space, "Ċ" a newline, and each of the 256 alphabet characters one byte
    from tokenizers import pre_tokenizers

    for ch in pre_tokenizers.ByteLevel.alphabet():
        i = bpe.convert_tokens_to_ids(ch)
        assert len(vocabs["bpe"].token_bytes[i]) == 1
    assert sorted(vocabs["bpe"].token_bytes[bpe.convert_tokens_to_ids(c)] for c in pre_tokenizers.ByteLevel.alphabet()) == [
        bytes([b]) for b in range(256)
    ]
    assert vocabs["bpe"].token_bytes[bpe.convert_tokens_to_ids("Ġ")] == b" "
    assert vocabs["bpe"].token_bytes[bpe.convert_tokens_to_ids("Ċ")] == b"\n"
    # SentencePiece: "▁" is a space, "<0xNN>" the raw byte NN
    for b in range(256):
        i = sp.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert vocabs["sp"].token_bytes[i] == bytes([b])
        assert not vocabs["sp"].is_special[i]
    assert vocabs["sp"].token_bytes[sp.convert_tokens_to_ids("▁")] == b" "
    word = next(p for p in sp.get_vocab() if p.startswith("▁") and len(p) > 2 and p[1:].isalpha())
    assert vocabs["sp"].token_bytes[sp.convert_tokens_to_ids(word)] == (" " + word[1:]).encode()


def test_a_member_without_byte_fallback_reads_what_it_cannot_spell_as_its_tokenizer_does(tokenizers, vocabs, caplog):
    """The Unigram member has no byte tokens: a character outside its pieces is `<unk>`, as its own
    tokenizer reads it ("ñ" too, though its first byte is also the first byte of its "é"), and `<unk>`
    stands for no bytes; the bytes of a character cut in two are left out (warned once), until the
    character is whole. Scoring gives an `<unk>` the bytes of the characters it replaced."""
    tok, mv = tokenizers["unigram"], vocabs["unigram"]
    unk = tok.unk_token_id
    assert mv.unk_id == unk and mv.is_special[unk] and mv.token_bytes[unk] == b""
    assert vocabs["bpe"].unk_id is None  # SmolLM2-like: its unk is its eos
    assert "é".encode()[0] == "ñ".encode()[0] and tok.convert_tokens_to_ids("é") != unk
    for text in ("ñ", "éñ", "a\tb", " 你好 👋 x", "straße"):
        assert unk in tok.encode(text, add_special_tokens=False), text
        assert mv.encode_bytes(text.encode()) == tok.encode(text, add_special_tokens=False), text
    caplog.clear()
    assert mv.encode_bytes("ñ".encode()[:1]) == [] and mv.encode_bytes(b"a" + "你".encode()[1:]) == tok.encode("a", add_special_tokens=False)
    assert sum("has no token for byte" in r.getMessage() for r in caplog.records) <= 1
    context, continuation = "Answer:", " 你好 👋!"
    ids = tok.encode(context + continuation, add_special_tokens=False)[len(tok.encode(context, add_special_tokens=False)) :]
    assert tok.convert_ids_to_tokens(ids) == ["▁", "<unk>", "▁", "<unk>", "!"]
    assert mv.reading_lengths(context + continuation, ids).tolist() == [1, 6, 1, 4, 1]
    assert mv.token_lengths[ids].tolist() == [1, 0, 1, 0, 1]  # what a token alone stands for


def test_byte_tokens_flagged_special_keep_their_byte_and_are_hidden(vocabs, sp_special_bytes_member):
    """Fed and scored as their byte, like the plain sp member's; only decoding drops them."""
    from transformers import AutoTokenizer

    from lm_eval_rlae.engine.vocab import MemberVocab

    tok = AutoTokenizer.from_pretrained(sp_special_bytes_member)
    mv = MemberVocab.from_tokenizer(tok, vocab_size=None)
    assert mv.token_bytes == vocabs["sp"].token_bytes and mv.is_special == vocabs["sp"].is_special
    assert mv.hidden_ids == {tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    assert not vocabs["sp"].hidden_ids and not vocabs["bpe"].hidden_ids
    assert mv.decode_bytes(mv.encode_bytes(b"\x18\xf0\x9f")) == b"\x18\xf0\x9f"


@pytest.mark.parametrize("kind", TINY)
def test_padded_logit_rows_stand_for_nothing(tokenizers, padded_vocabs, kind):
    tok, mv = tokenizers[kind], padded_vocabs[kind]
    assert len(mv.token_bytes) == len(mv.is_special) == len(tok) + PAD_ROWS
    for i in range(len(tok), len(tok) + PAD_ROWS):
        assert mv.token_bytes[i] == b""
        assert mv.is_special[i]
        assert i not in mv.eos_ids


# ------------------------------------------------------------------------------- UnionVocab


def test_every_member_token_has_a_union_id_with_the_same_bytes_and_a_way_back(union):
    uv, members, _ = union
    assert len(uv.token_bytes) == uv.size
    for m, mv in enumerate(members):
        assert tuple(uv.to_union[m].shape) == (len(mv.token_bytes),)
        assert tuple(uv.from_union[m].shape) == (uv.size,)
        assert uv.to_union[m].dtype == torch.long and uv.from_union[m].dtype == torch.long
        to_u, from_u = uv.to_union[m].tolist(), uv.from_union[m].tolist()
        for i, b in enumerate(mv.token_bytes):
            if mv.is_special[i]:
                continue
            u = to_u[i]
            assert 0 <= u < uv.size
            assert uv.token_bytes[u] == b, (m, i)
            back = from_u[u]
            assert back >= 0 and mv.token_bytes[back] == b, (m, i, u, back)
        # from_union: -1, or an id of the member with exactly the union token's bytes
        for u in range(uv.size):
            back = from_u[u]
            assert -1 <= back < len(mv.token_bytes)
            if back >= 0 and u != uv.eos:
                assert mv.token_bytes[back] == uv.token_bytes[u], (m, u, back)


def test_tokens_with_the_same_bytes_share_a_union_id_across_members(union):
    """The union id for some bytes that both members can spell with one token is shared:
    the lowest union id with those bytes maps back into every member that has such a token."""
    uv, members, _ = union
    first: dict[bytes, int] = {}
    for u, b in enumerate(uv.token_bytes):
        if not uv_is_special(uv, u):
            first.setdefault(b, u)
    regular = [{x for i, x in enumerate(mv.token_bytes) if not mv.is_special[i]} for mv in members]
    shared = 0
    for b, u in first.items():
        owners = [m for m in range(len(members)) if b in regular[m]]
        for m in owners:
            back = int(uv.from_union[m][u])
            assert back >= 0 and members[m].token_bytes[back] == b, (b, m)
        shared += len(owners) >= 2
    assert shared >= 256  # at least every single byte is shared by the byte-level and byte-fallback families


def uv_is_special(uv, u) -> bool:
    return u == uv.eos or uv.token_bytes[u] == b""


def test_all_eos_tokens_map_to_the_union_eos(union, tokenizers):
    uv, members, kinds = union
    assert 0 <= uv.eos < uv.size
    assert uv.token_bytes[uv.eos] == b""
    for m, mv in enumerate(members):
        assert mv.eos_ids
        for e in mv.eos_ids:
            assert int(uv.to_union[m][e]) == uv.eos
        assert int(uv.from_union[m][uv.eos]) in mv.eos_ids
    for kind, mv in zip(kinds, members):
        assert tokenizers[kind].eos_token_id in mv.eos_ids


def test_union_bytes_are_unique_up_to_a_members_own_duplicates(union):
    """Non-special union entries are distinct byte strings, except that a member with several
    tokens for the same bytes (SentencePiece "A" and its byte-fallback twin "<0x41>") may keep
    them apart: a byte string appears in the union at most as often as in the member that has it
    most often."""
    uv, members, _ = union
    in_union = Counter(b for u, b in enumerate(uv.token_bytes) if not uv_is_special(uv, u))
    per_member = [Counter(b for i, b in enumerate(mv.token_bytes) if not mv.is_special[i]) for mv in members]
    for b, n in in_union.items():
        assert n <= max(c[b] for c in per_member), (b, n)
    # and nothing is in the union that no member has
    assert set(in_union) == set().union(*per_member)
    assert len(in_union) >= max(len(c) for c in per_member)


def test_a_single_member_union_is_one_to_one(vocabs):
    from lm_eval_rlae.engine.vocab import UnionVocab

    for kind in TINY:
        mv = vocabs[kind]
        uv = UnionVocab([mv])
        regular = [i for i in range(len(mv.token_bytes)) if not mv.is_special[i]]
        us = uv.to_union[0][regular]
        assert len(set(us.tolist())) == len(regular), kind
        assert uv.from_union[0][us].tolist() == regular, kind
        # two copies of a member: the same union
        uv2 = UnionVocab([mv, mv])
        assert uv2.size == uv.size
        assert torch.equal(uv2.to_union[0], uv2.to_union[1])


def test_union_ids_of_canonical_tokens_spell_the_text(union, tokenizers):
    uv, members, kinds = union

    @PROPERTY
    @given(text_strategies.text)
    def check(t):
        for m, kind in enumerate(kinds):
            tt = _text_for(kind, t)
            ids = tokenizers[kind].encode(tt, add_special_tokens=False)
            us = uv.to_union[m][ids].tolist() if ids else []
            assert all(0 <= u < uv.size for u in us)
            assert b"".join(uv.token_bytes[u] for u in us) == _reading(kind, members[m], tt.encode("utf-8"))

    check()


def test_any_members_tokens_reach_every_other_member_byte_exactly(union):
    """Generation feeds each member the chosen union token as its own id, or re-encoded: for any
    bytes, cut wherever one member's tokens end (inside characters too), every member that spells
    every byte is fed exactly those bytes (less those that either member cannot spell), and every
    member reads each piece as it reads it alone. A `<unk>` is never chosen where vocabularies mix."""
    uv, members, kinds = union

    @PROPERTY
    @given(text_strategies.any_bytes)
    def check(data):
        for p, proposer in enumerate(members):
            chosen = [u for u in uv.to_union[p][proposer.encode_bytes(data)].tolist() if u not in uv.unknown]
            written = _reading(kinds[p], proposer, data)
            assert b"".join(uv.token_bytes[u] for u in chosen) == written
            for m, (kind, mv) in enumerate(zip(kinds, members)):
                fed, read = [], b""
                for u in chosen:
                    own = int(uv.from_union[m][u])
                    fed += [own] if own >= 0 else mv.encode_bytes(uv.token_bytes[u])
                    read += _reading(kind, mv, uv.token_bytes[u])
                assert mv.decode_bytes(fed) == read
                if kind not in UNK:
                    assert read == written.translate(None, mv.unspellable_bytes)

    check()


def test_scatter_conserves_probability_and_is_identity_for_one_member(vocabs):
    from lm_eval_rlae.engine.vocab import UnionVocab

    gen = torch.Generator().manual_seed(0)
    mvs = [vocabs["bpe"], vocabs["sp"]]
    uv = UnionVocab(mvs)
    probs = [torch.rand(3, len(mv.token_bytes), generator=gen).softmax(-1) for mv in mvs]
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    mixed = uv.scatter(probs, weights)
    assert tuple(mixed.shape) == (3, uv.size)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    # one-hot weights: the member's own distribution, moved to union ids
    torch.testing.assert_close(mixed[1, uv.to_union[0]], probs[0][1], atol=1e-6, rtol=0)
    one = UnionVocab([mvs[1]])
    single = one.scatter([probs[1]], torch.ones(3, 1))
    torch.testing.assert_close(single[:, one.to_union[0]], probs[1], atol=1e-6, rtol=0)


@PROPERTY
@given(data=st.data())
def test_keep_utf8_zeroes_exactly_the_tokens_that_break_a_character(union, data):
    """Against the definition: on the chosen rows, the tokens `continues` rejects get probability
    0, unless that would leave the row nothing; other rows are untouched. Texts on a character
    boundary and texts inside one take different paths."""
    uv, _, _ = union
    texts = data.draw(st.lists(st.binary(max_size=6) | st.just(b"ab"), min_size=1, max_size=4))
    batch = len(texts)
    rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    probs = torch.rand(batch, uv.size, generator=generator)
    only_breaking = data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    for r, text in enumerate(texts):  # some rows hold mass only on tokens that break their text
        if only_breaking[r]:
            probs[r] *= ~uv.continues(torch.tensor([utf8.next_byte_range(text)]))[0]
    states = torch.tensor([utf8.next_byte_range(text) for text in texts])
    allowed = uv.continues(states)  # [B, U]
    want = torch.where((rows & ((probs * allowed).sum(-1) > 0))[:, None], probs * allowed, probs)
    assert torch.equal(uv.keep_utf8(probs.clone(), states, rows), want)

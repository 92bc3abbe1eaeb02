"""Byte-exact vocabularies: every member token as the bytes it stands for, and their union.

A member's token is reduced to the exact bytes it adds to the text:
- byte-level BPE (GPT-2, Llama-3, SmolLM): each character of the token string is one byte through
  the GPT-2 byte-to-unicode table;
- SentencePiece style (Llama-2, Gemma): `▁` is a space and `<0xNN>` is the raw byte NN (byte
  fallback);
- added tokens that are not special stand for their content; special tokens (bos, eos, pad, chat
  markers) stand for no text and are kept apart in the union, keyed by their content, with every
  end-of-sequence token unified into one union id;
- `<unk>` (a tokenizer without byte fallback, e.g. a SentencePiece Unigram, reads a character it
  has no piece for as `<unk>`) is special too: it stands for no bytes of its own, only for the
  characters it replaced where the member's tokenizer put it (`reading_lengths`).

The union is the set of distinct byte strings over all members. Fusing is then a scatter-add of
each member's next-token distribution through `to_union[m]`, and feeding a chosen union token back
to member m is `from_union[m]` (its own id for exactly those bytes) or, when m has no such token,
`encode_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from lm_eval_rlae.engine import utf8

logger = logging.getLogger(__name__)

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_LONE_SURROGATES = re.compile(r"[\udc80-\udcff]+")  # bytes that are not UTF-8, after surrogateescape
_PROBE = "Hello, world!  x=12+7\n\tÜber straße 東京 🙂  end"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    """True when the fast tokenizer's decoder is (or contains) a ByteLevel decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; rlae needs a fast (tokenizers-backed) "
            "tokenizer to read token bytes exactly. Install `tokenizers` or pass a model with a tokenizer.json."
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack = [decoder]
    while stack:
        node = stack.pop()
        if node.get("type") == "ByteLevel":
            return True
        stack.extend(node.get("decoders") or [])
    return False


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if byte_level:
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    if m := _BYTE_FALLBACK.match(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


@dataclass
class MemberVocab:
    """One member's tokens as bytes.

    token_bytes[i]: the exact bytes id i adds to the text (b"" for special tokens and for
    embedding rows past the tokenizer, which stand for nothing).
    hidden_ids: byte-fallback ids the tokenizer also flags special. They stand for their byte when
    fed and scored, but the member's decoder drops them (hf decodes with skip_special_tokens).
    unk_id: the id its tokenizer gives a run of characters it cannot spell (a Unigram's `<unk>`), or
    None. Special: no bytes, never chosen as text where vocabularies are mixed (see `UnionVocab`).
    """

    tokenizer: object
    token_bytes: list[bytes]
    is_special: list[bool]
    is_byte_fallback: list[bool]
    eos_ids: set[int]
    special_content: dict[int, str] = field(default_factory=dict)  # special id -> its content, e.g. "<|im_end|>"
    hidden_ids: set[int] = field(default_factory=set)
    unk_id: int | None = None
    _dropped: set[int] = field(default_factory=set, init=False, repr=False)  # unspellable bytes met so far, warned once

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None, eos_ids=()) -> MemberVocab:
        """vocab_size: width of the model's logits (may exceed len(tokenizer)); eos_ids: extra
        end-of-sequence ids (e.g. from the generation config) besides tokenizer.eos_token_id."""
        byte_level = _is_byte_level(tokenizer)
        size = max(vocab_size or 0, len(tokenizer))
        token_bytes = [b""] * size
        is_special = [True] * size  # rows the tokenizer does not know stand for nothing
        is_byte_fallback = [False] * size
        for piece, i in tokenizer.get_vocab().items():
            token_bytes[i] = _piece_bytes(piece, byte_level)
            is_special[i] = False
            is_byte_fallback[i] = not byte_level and bool(_BYTE_FALLBACK.match(piece))
        special_content, hidden_ids = {}, set()
        special_ids = set(tokenizer.all_special_ids)
        for i, added in tokenizer.added_tokens_decoder.items():
            if is_byte_fallback[i]:  # some tokenizers list their <0xNN> pieces as added tokens
                if added.special:  # ... flagged special: still the byte, but decoding drops it
                    hidden_ids.add(i)
                continue
            if added.special or i in special_ids:
                token_bytes[i], is_special[i], special_content[i] = b"", True, added.content
            else:  # an added word stands for its literal content, not for byte-level characters
                token_bytes[i], is_special[i] = added.content.encode("utf-8"), False
        eos = {int(e) for e in eos_ids if e is not None}
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        for i in eos:
            special_content.setdefault(i, tokenizer.convert_ids_to_tokens(i))
            token_bytes[i], is_special[i] = b"", True
        unk = tokenizer.unk_token_id  # SmolLM2's unk is its eos: then there is none
        unk = unk if unk is not None and unk not in eos and is_special[unk] else None
        vocab = cls(tokenizer, token_bytes, is_special, is_byte_fallback, eos, special_content, hidden_ids, unk)
        vocab._check_lossless()
        return vocab

    def _check_lossless(self) -> None:
        own = self.tokenizer.encode(_PROBE, add_special_tokens=False)
        if not self._is_reading(_PROBE, own):
            got = self.decode_bytes(own)
            logger.warning(
                "%s does not reproduce text byte-exactly (%r -> %r): its normalizer changes text, so "
                "tokens it shares with other members may be matched approximately.",
                getattr(self.tokenizer, "name_or_path", "tokenizer"), _PROBE, got.decode("utf-8", "replace"),
            )

    @property
    def eos_id(self) -> int:
        """The id fed to this member when the ensemble ends a sequence."""
        own = self.tokenizer.eos_token_id
        return own if own is not None else min(self.eos_ids)

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def text_piece(self, i: int) -> tuple[bytes, bool] | None:
        """What id i adds to generated text, as the member's decoder with skip_special_tokens (hf's
        tok_decode) has it: its bytes and whether it is byte fallback (see `utf8.decode`), or None
        for ids it drops (special, hidden), which must not split a run of byte-fallback pieces."""
        if self.token_bytes[i] and i not in self.hidden_ids:
            return self.token_bytes[i], self.is_byte_fallback[i]
        return None

    @cached_property
    def fingerprint(self) -> str:
        """Which vocabulary this is: sha256 of every id's bytes (special tokens: their content)."""
        digest = hashlib.sha256()
        for i, piece in enumerate(self.token_bytes):
            piece = piece or self.special_content.get(i, "").encode("utf-8")
            digest.update(len(piece).to_bytes(4, "little") + piece)
        return digest.hexdigest()[:16]

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """[V] how many bytes each id adds to the text."""
        return np.array([len(b) for b in self.token_bytes])

    @cached_property
    def _longest_match(self) -> tuple[dict[bytes, int], int]:
        best: dict[bytes, int] = {}
        for i, b in enumerate(self.token_bytes):
            if b and not self.is_special[i] and (b not in best or self.is_byte_fallback[best[b]]):
                best[b] = i
        return best, max(map(len, best))

    @cached_property
    def unspellable_bytes(self) -> bytes:
        """Bytes that no token contains. A byte-level BPE trained without the full byte alphabet
        lacks some (SmolLM2 lacks 21, e.g. 0x04 and 0xF1); its own tokenizer drops them from text."""
        table, _ = self._longest_match
        return bytes(sorted(set(range(256)) - {b for piece in table for b in piece}))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids whose bytes are exactly `data`, for any bytes, including partial UTF-8, as far as
        the member can spell them: as its own tokenizer reads the text.

        Valid UTF-8 runs go through the member's own tokenizer (its canonical tokens, checked to be
        byte-exact but for `unspellable_bytes`, which it drops, and the characters it reads as
        `<unk>`); the rest, broken characters, is matched greedily, longest token first, which
        always succeeds when the vocabulary covers every byte (byte-level BPE, SentencePiece byte
        fallback). A member without byte fallback has no token for a byte of a character cut in
        two: it reads such bytes only once the character is whole (`fusion.Generation` re-encodes
        it then), as its own piece or as `<unk>`.
        """
        ids: list[int] = []
        text = data.decode("utf-8", errors="surrogateescape")
        pos = 0
        for m in [*_LONE_SURROGATES.finditer(text), None]:
            valid = text[pos : m.start() if m else len(text)]
            if valid:
                own = self.tokenizer.encode(valid, add_special_tokens=False)
                ids += own if self._is_reading(valid, own) else self._greedy(valid.encode("utf-8"))
            if m:
                ids += self._greedy(m.group().encode("utf-8", errors="surrogateescape"))
                pos = m.end()
        return ids

    def _is_reading(self, text: str, ids: list[int]) -> bool:
        """Whether `ids`, the tokenizer's for `text`, spell it byte-exactly, but for the bytes no
        token contains (left out) and the characters read as `<unk>` (left to it)."""
        raw, spelt = text.encode("utf-8"), self.decode_bytes(ids)
        if spelt == raw or spelt == raw.translate(None, self.unspellable_bytes):
            return True
        if self.unk_id is None or self.unk_id not in ids:
            return False
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = [span for i, span in zip(encoding.input_ids, encoding.offset_mapping) if i == self.unk_id]
        known, start = [], 0
        for begin, end in unknown:
            known.append(text[start:begin])
            start = end
        return spelt == "".join(known + [text[start:]]).encode("utf-8").translate(None, self.unspellable_bytes)

    def reading_lengths(self, text: str, ids: list[int]) -> np.ndarray:
        """[len(ids)] bytes of `text` that each of `ids` stands for, where `ids` are the last ids of
        the member's reading of `text` (a continuation being scored): a token's own bytes, and for
        `<unk>` the characters it replaced (by the tokenizer's offsets). Scoring cuts text where
        every member has a token boundary, so an `<unk>` must span its characters there."""
        lengths = self.token_lengths[list(ids)]
        if self.unk_id is None or self.unk_id not in ids:
            return lengths
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n = min(len(ids), len(encoding.input_ids))  # a leading <bos> of ids is not in it
        first, own_first = len(ids) - n, len(encoding.input_ids) - n
        if list(ids[first:]) != encoding.input_ids[own_first:]:
            return lengths
        for k, (i, (begin, end)) in enumerate(zip(encoding.input_ids[own_first:], encoding.offset_mapping[own_first:])):
            if i == self.unk_id:
                lengths[first + k] = len(text[begin:end].encode("utf-8"))
        return lengths

    def _greedy(self, data: bytes) -> list[int]:
        table, longest = self._longest_match
        ids, pos = [], 0
        while pos < len(data):
            for n in range(min(longest, len(data) - pos), 0, -1):
                if (i := table.get(data[pos : pos + n])) is not None:
                    ids.append(i)
                    pos += n
                    break
            else:  # a byte no token spells alone: the member reads the text without it
                self._warn_dropped(data[pos])
                pos += 1
        return ids

    def _warn_dropped(self, byte: int) -> None:
        """Once per byte; once in all for a member with `<unk>`, which meets every byte of every
        character it has no piece for, and reads the whole character later."""
        if byte in self._dropped or (self.unk_id is not None and self._dropped):
            return
        self._dropped.add(byte)
        name = getattr(self.tokenizer, "name_or_path", "tokenizer")
        if self.unk_id is None:
            logger.warning("%s has no token for byte %#04x, so it reads text without it (as its own tokenizer does)", name, byte)
        else:
            logger.warning(
                "%s has no token for byte %#04x of a broken or unfinished character: it reads the character once "
                "it is whole, as its own tokenizer does (its piece, or <unk>)", name, byte,
            )


class UnionVocab:
    """The union of members' vocabularies, keyed by exact bytes.

    Union id `eos` (0) stands for every member's end-of-sequence tokens; other special tokens get
    one union id per distinct content (so `<|im_start|>` of two members is one id); every distinct
    non-empty byte string gets one id. Ids a member's logits have but its tokenizer lacks go to a
    sink column (`size`) that is never chosen. `unknown` holds the union ids of members' `<unk>`.
    """

    eos = 0

    def __init__(self, members: list[MemberVocab], device: torch.device | str = "cpu"):
        index: dict[object, int] = {"<eos>": self.eos}
        self.token_bytes: list[bytes] = [b""]
        to_union = []
        for vocab in members:
            ids = [-1] * len(vocab.token_bytes)  # -1: an embedding row the tokenizer does not know
            seen: dict[bytes, int] = {}
            # A member's regular token comes before its byte-fallback twin, so the first token for
            # some bytes is the one shared across members; a member's further tokens for the same
            # bytes get union ids of their own, keeping its ids and union ids one to one.
            for i in sorted(range(len(ids)), key=lambda i: (vocab.is_byte_fallback[i], i)):
                b = vocab.token_bytes[i]
                if i in vocab.eos_ids:
                    key = "<eos>"
                elif vocab.is_special[i]:
                    if i not in vocab.special_content:
                        continue
                    key = ("special", vocab.special_content[i])
                else:
                    key = (b, seen.get(b, 0))
                    seen[b] = key[1] + 1
                if key not in index:
                    index[key] = len(self.token_bytes)
                    self.token_bytes.append(b)  # b"" for eos and special tokens
                ids[i] = index[key]
            to_union.append(ids)
        self.size = len(self.token_bytes)
        leading = [utf8.leading_continuation_bytes(b) for b in self.token_bytes]
        self._length = torch.tensor([len(b) for b in self.token_bytes], device=device)  # [U]
        self._leading = torch.tensor(leading, device=device)  # [U] continuation bytes it starts with
        self._first = torch.tensor([b[0] if b else -1 for b in self.token_bytes], device=device)  # [U]
        self._tail_valid = torch.tensor([utf8.is_valid_prefix(b[n:]) for b, n in zip(self.token_bytes, leading)], device=device)
        self._starts_character = self._tail_valid & (self._leading == 0)  # [U] fine after a whole character
        self._breaks_character = (~self._starts_character).nonzero()[:, 0]  # [K] the few ids that cannot start a character
        # members with one tokenizer mix without breaking characters; only distinct vocabularies need the guard
        fingerprints = [hash(tuple(vocab.token_bytes)) for vocab in members]
        self.vocab_groups = [[m for m, f in enumerate(fingerprints) if f == g] for g in dict.fromkeys(fingerprints)]
        self.to_union = [torch.tensor([u if u >= 0 else self.size for u in ids], device=device) for ids in to_union]
        self.unknown = torch.tensor(sorted({ids[v.unk_id] for v, ids in zip(members, to_union) if v.unk_id is not None}), dtype=torch.long, device=device)  # [K]
        self.from_union = []
        for vocab, ids in zip(members, to_union):
            back = torch.full((self.size,), -1, dtype=torch.long)
            for i, u in enumerate(ids):
                if u > self.eos:
                    back[u] = i
            if vocab.eos_ids:
                back[self.eos] = vocab.eos_id
            self.from_union.append(back)

    def keep_utf8(self, probs: torch.Tensor, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Zero, on `rows` ([B] bool), the union tokens that would break the texts' UTF-8 (see
        `continues`), in place; a row left with nothing to choose keeps every token.

        probs: [B, U]; states: [B, 3] the texts' `next_byte_range`.
        """
        rows = rows.cpu()
        inside = rows & (states[:, 0] > 0)  # [B] texts that end inside a character: every token is checked
        if inside.any():
            on_device = inside.to(probs.device)
            part = probs[on_device]  # [b, U]
            kept = part * self.continues(states[inside])
            probs[on_device] = torch.where((kept.sum(-1) > 0)[:, None], kept, part)
        # texts on a character boundary: only the few tokens that cannot start one go
        boundary = (rows & ~inside).to(probs.device)[:, None]  # [B, 1]
        if boundary.any():
            held = probs[:, self._breaks_character]  # [B, K]
            probs[:, self._breaks_character] = held.masked_fill(boundary, 0)
            emptied = boundary & (probs.sum(-1, keepdim=True) <= 0)  # [B, 1]
            if emptied.any():
                probs[:, self._breaks_character] = torch.where(emptied, held, probs[:, self._breaks_character])
        return probs

    def drop_unknown(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Zero `<unk>` on `rows` ([B] bool), in place, unless a row is left with nothing.

        Where vocabularies are mixed, a member's `<unk>` ("a character I cannot spell") is no text the
        others could be fed, and it must not reach its own member where the text has no character.
        """
        if not len(self.unknown) or not rows.any():
            return probs
        rows = rows.to(probs.device)[:, None]  # [B, 1]
        held = probs[:, self.unknown]  # [B, K]
        probs[:, self.unknown] = held.masked_fill(rows, 0)
        emptied = rows & (probs.sum(-1, keepdim=True) <= 0)
        if emptied.any():
            probs[:, self.unknown] = torch.where(emptied, held, probs[:, self.unknown])
        return probs

    def continues(self, states: torch.Tensor) -> torch.Tensor:
        """[B, 3] texts' `next_byte_range` -> [B, U] whether each union token keeps the text UTF-8:
        it supplies the pending continuation bytes (all of them, or fewer and nothing else), in
        range, and is valid itself apart from a last character it may leave unfinished."""
        states = states.to(self._length.device)
        pending, lo, hi = states.T[..., None]  # each [B, 1]
        in_range = (self._first >= lo) & (self._first <= hi)
        supplies = (self._leading == pending) | ((self._leading == self._length) & (self._length < pending) & (self._length > 0))
        return torch.where(pending > 0, self._tail_valid & in_range & supplies, self._starts_character)

    def scatter(self, probs_m: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of members' next-token distributions in the union.

        probs_m[m]: [B, V_m], or None for a member without weight in these rows; weights: [B, M] ->
        [B, U]. One vectorised index_add per member.
        """
        device = self.to_union[0].device
        union = torch.zeros(weights.shape[0], self.size + 1, dtype=torch.float32, device=device)
        weights = weights.to(device)
        for m, probs in enumerate(probs_m):
            if probs is None:
                continue
            union.index_add_(1, self.to_union[m][: probs.shape[-1]], probs.to(device, torch.float32) * weights[:, m : m + 1])
        return union[:, : self.size]

"""Which ids a member is fed for a chosen union token.

Its own id for the token's bytes when it has one; otherwise a re-encoding of the bytes in its own
tokens, which is brought back to its canonical tokenization at the next boundary (a word's start,
or a whole non-ASCII character for scripts without spaces). `queued` says what one token does to a
member's ids without doing it, so the plain engine can apply it and the speculative one can plan a
draft's feed ahead and see where it stops being an append.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_rlae.engine import utf8

_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


@dataclass
class Sync:
    """What a member was fed since its last word boundary, to re-tokenize it there if needed.

    dirty: some of `fed` are not the member's own token for the chosen text (it was fed a
    re-encoding of another member's token), so they may not be its canonical tokenization.
    """

    fed: list[int] = field(default_factory=list)
    text: bytes = b""
    dirty: bool = False


def queued(vocab, sync: Sync, own: int, piece: bytes) -> tuple[int, list[int], Sync]:
    """What appending `piece` does to a member's ids: (drop: how many of its last ids go, add: the
    ids that follow them, its sync after). `own` is the member's id for the piece, -1 if it has none.

    A member fed its own id for the piece is never re-tokenized. One fed a re-encoding is brought
    back to its canonical tokens when the next word starts, or as soon as a whole non-ASCII
    character is in (scripts such as Chinese and Japanese do not separate words by spaces): then,
    in the same step, so the canonical ids take the place of the piece's own.
    """
    drop, add = 0, []

    def close(sync: Sync) -> Sync:
        """End the run of ids since the last boundary: a re-encoding that is not the member's
        canonical tokens for that text is replaced by them."""
        nonlocal drop
        if sync.dirty and (canonical := vocab.encode_bytes(sync.text)) != sync.fed:
            in_add = min(len(sync.fed), len(add))  # the run's ids this very piece added
            del add[len(add) - in_add :]
            drop += len(sync.fed) - in_add
            add.extend(canonical)
        return Sync()

    if piece and piece[0] in _WHITESPACE:
        sync = close(sync)
    new = [own] if own >= 0 else vocab.encode_bytes(piece)
    sync = Sync(sync.fed + new, sync.text + piece, sync.dirty or (own < 0 and bool(piece)))
    add.extend(new)
    if _ends_non_ascii_character(sync.text):
        sync = close(sync)
    return drop, add, sync


def _ends_non_ascii_character(text: bytes) -> bool:
    return bool(text) and text[-1] >= 0x80 and utf8.pending_continuation_bytes(text) == 0

"""UTF-8 bookkeeping for text assembled from the byte pieces of several tokenizers."""

from __future__ import annotations

import itertools

# The first continuation byte after these lead bytes has a narrower range (no overlong forms,
# no surrogates, nothing past U+10FFFF); any other continuation byte is 0x80-0xBF.
_FIRST_CONTINUATION = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _char_size(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1


def leading_continuation_bytes(data: bytes) -> int:
    n = 0
    while n < len(data) and data[n] & 0xC0 == 0x80:
        n += 1
    return n


def is_valid_prefix(data: bytes) -> bool:
    """Valid UTF-8, apart from a last character that is not finished yet."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data" and error.end == len(data)


def next_byte_range(text: bytes) -> tuple[int, int, int]:
    """(pending, lo, hi): how many continuation bytes `text` needs to finish its last character,
    and the range the next byte must be in when pending > 0."""
    for back in range(1, min(4, len(text)) + 1):
        lead = text[-back]
        if lead & 0xC0 != 0x80:
            pending = max(_char_size(lead) - back, 0)
            lo, hi = _FIRST_CONTINUATION.get(lead, (0x80, 0xBF)) if back == 1 else (0x80, 0xBF)
            return pending, lo, hi
    return 0, 0x80, 0xBF


def pending_continuation_bytes(text: bytes) -> int:
    return next_byte_range(text)[0]


def decode(pieces: list[tuple[bytes, bool]]) -> str:
    """Text of generated pieces (bytes, whether the member that chose it has it as a byte-fallback
    token), always valid.

    Valid UTF-8 decodes as itself. Bytes that are not UTF-8 become U+FFFD as the members' own
    decoders do it: a run of byte-fallback pieces that is not UTF-8 gives one U+FFFD per byte
    (SentencePiece's ByteFallback); other bytes are decoded leniently, one U+FFFD per maximal
    invalid sequence (byte-level BPE). Chunks end on character boundaries, never inside a run of
    byte-fallback pieces, so one broken character does not spoil its neighbours.
    """
    text, chunk, data = [], [], b""
    for i, (piece, fallback) in enumerate(pieces):
        chunk.append((piece, fallback))
        data += piece
        run_goes_on = fallback and i + 1 < len(pieces) and pieces[i + 1][1]
        if i + 1 == len(pieces) or (pending_continuation_bytes(data) == 0 and not run_goes_on):
            text.append(_decode_chunk(chunk, data))
            chunk, data = [], b""
    return "".join(text)


def _decode_chunk(pieces: list[tuple[bytes, bool]], data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = []
    for fallback, group in itertools.groupby(pieces, key=lambda piece: piece[1]):
        run = b"".join(piece for piece, _ in group)
        if fallback:
            try:
                text.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                text.append("\ufffd" * len(run))
        else:
            text.append(run.decode("utf-8", errors="replace"))
    return "".join(text)

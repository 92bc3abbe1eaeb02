"""Hypothesis strategies for text that stresses tokenizers: emoji (ZWJ, skin tones, flags), CJK,
combining marks, tabs, runs of spaces, newlines, CR, NUL and characters from every plane; and any
bytes, partial UTF-8 included."""

from __future__ import annotations

from hypothesis import strategies as st

PIECES = [
    "🤗", "😀", "👍🏽", "🇫🇷", "👩‍👩‍👧", "你好", "世界。", "한국어", "日本語", "é", "e\u0301", "ñ", "ß",
    "\u200d", "\t", "\t\t", "\n", "\n\n", "\r\n", "\x00", " ", "  ", "    ", "𝔘", "﷽", "the", " the",
    "Q: 12+7=\nA:", " 19", "...", "don't", "<", ">", "<0x41>",
]

# Any valid text (no lone surrogates), with a bias towards the pieces above.
text = st.lists(
    st.one_of(st.characters(codec="utf-8"), st.sampled_from(PIECES)),
    max_size=30,
).map("".join)

# Any bytes: random, valid text, valid text cut anywhere (inside a multi-byte character too), and
# runs of lone lead / continuation bytes.
any_bytes = st.one_of(
    st.binary(max_size=48),
    text.map(lambda t: t.encode("utf-8")),
    st.tuples(text, st.integers(0, 64), st.integers(0, 64)).map(lambda x: x[0].encode("utf-8")[x[1] : x[1] + x[2]]),
    st.lists(st.sampled_from([b"\xf0\x9f", b"\x98\x80", b"\xe4\xbd", b"\xa0", b" ", b"\n", b"\xff", b"\x00", b"ab"]), max_size=12).map(b"".join),
)

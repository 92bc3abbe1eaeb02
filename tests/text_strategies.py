"""Hypothesis strategies for text that stresses tokenizers: emoji (ZWJ, skin tones, flags), CJK,
combining marks, tabs, runs of spaces, newlines, CR, NUL and characters from every plane."""

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

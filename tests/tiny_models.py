"""Tiny, deterministic, local Hugging Face members of three tokenizer families, built in seconds.

- ``bpe``: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer/decoder, the 256-byte initial
  alphabet), ``<|endoftext|>`` as bos/eos, ChatML-style chat markers, a random ``LlamaForCausalLM``.
- ``sp``: SentencePiece style like Gemma 3: BPE with ``byte_fallback``, " " -> "▁" normalizer
  with no dummy prefix, pieces start at "▁", the 256 ``<0xNN>`` byte tokens in the model vocab,
  ``<bos>`` prepended by the post-processor, Gemma-style turn markers, a random
  ``Gemma3ForCausalLM`` (``Gemma3TextConfig``).
- ``unigram``: SentencePiece Unigram (T5 / ALBERT style) with NO byte fallback: a Metaspace
  pre-tokenizer (" " -> "▁", no dummy prefix), pieces of printable ASCII plus "é" and "ü", and
  ``<unk>`` for every other character (tabs, most non-ASCII, emoji, CJK), fused over a run; a
  random ``Olmo2ForCausalLM`` (transformers loads a Qwen2 model's tokenizer as Qwen2's byte-level
  BPE whatever its tokenizer.json says; OLMo 2 takes the file as it is). Decoding drops ``<unk>`` (a special token), as hf decodes.

All three directories load with ``AutoTokenizer.from_pretrained``, ``AutoModelForCausalLM.from_pretrained``
and ``lm_eval --model hf --model_args pretrained=<dir>``. The random weights use a large
``initializer_range`` so that greedy argmaxes are not near-ties (batching noise must not flip them).

Nothing here downloads anything. ``build_all(root)`` writes ``root/bpe``, ``root/sp`` and ``root/unigram``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# A few KB of English: sentences, numbers, arithmetic, punctuation, newlines. The tokenizers are
# trained on it; characters outside it (emoji, CJK, tabs) go through bytes, or become <unk>.
CORPUS = """\
The quick brown fox jumps over the lazy dog.
A small model can still learn a few useful words, numbers and signs.
Q: 12+7=
A: 19
Q: 3+5=
A: 8
Q: 40-15=
A: 25
Q: 6*7=
A: 42
Q: 100/4=
A: 25
Q: 9+10=
A: 19
Q: 81-27=
A: 54
Q: 2*2=
A: 4
Question: What is the capital of France?
Answer: Paris.
Question: Which animal says "moo"?
Answer: The cow.
Question: How many legs does a spider have?
Answer: Eight (8).
Once upon a time, there was a little house on a hill. In the house lived an old man,
his cat, and a very loud clock. Every morning at 7:30 the clock rang; every evening
the cat sat by the window and watched the birds fly home.
"Where are you going?" asked the cat. "To the market," said the old man, "to buy bread,
milk, eggs, and three red apples." He came back at 5 o'clock with 2 bags.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 30 42 50 64 99 100 128 256 1000.
Prices: $3.50, $12.99, 15% off; total = 27.48 (approx.).
Dates: 2024-01-15, 1999-12-31; times: 09:45, 23:59.
Lists:
- first item
- second item
- third item
1. one
2. two
3. three
Math: 1 + 1 = 2; 2 * 3 = 6; 10 - 4 = 6; 9 / 3 = 3; 7 + 8 = 15; 12 * 12 = 144.
If x = 5 and y = 3, then x + y = 8 and x * y = 15.
The sum of the first ten numbers is 55. The square of 11 is 121.
Science: water boils at 100 degrees and freezes at 0 degrees. The sun is a star.
The earth goes around the sun once a year; the moon goes around the earth.
Plants need light, water and air to grow. Birds can fly, fish can swim, and dogs can run.
History: people wrote on stone, then on paper, and now on computers and phones.
Code: def add(a, b): return a + b
print("hello, world!")
for i in range(10): print(i)
x = [1, 2, 3]; y = {"a": 1, "b": 2}
Punctuation: comma, period. colon: semicolon; question? exclamation! dash - quote " apostrophe ' (parens) [brackets] {braces} <angle> slash / backslash \\ at @ hash # and & star * plus + equals =.
She said: "It's a good day, isn't it?" He said: "Yes, it is!"
They're here; we're there; you'll see; I'd like that; it's fine.
The cat is on the mat. The dog is in the park. The bird is in the tree.
Red, green, blue, yellow, black, white, orange, purple, pink, brown.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
January, February, March, April, May, June, July, August, September, October, November, December.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
A good answer is short, clear and correct.
The best way to learn is to practice every day, step by step.
When the rain stops, the children go outside to play in the garden.
The teacher asked the class a question, and the students wrote their answers.
"""


def corpus_lines() -> list[str]:
    lines = CORPUS.splitlines(keepends=True)
    # Repeat with small variations so merges are stable and spaces/newlines get learned.
    out = []
    for k in range(3):
        for line in lines:
            out.append(line)
            if k:
                out.append(line.lower())
    return out


BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SP_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Llama-2 style: no turn markers of its own, the bos token opens the chat
UNIGRAM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)


# --------------------------------------------------------------------------- tokenizers


def build_bpe_tokenizer(vocab_size: int = 512, full_alphabet: bool = True):
    """GPT-2 style byte-level BPE, wrapped in a transformers fast tokenizer.

    full_alphabet=False: only the bytes of the corpus, as SmolLM2's tokenizer lacks 21 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token=None,
        pad_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = BPE_CHAT_TEMPLATE
    return fast


SP_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
SP_TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]


def build_sp_tokenizer(vocab_size: int = 600, special_bytes: bool = False):
    """SentencePiece-style (Gemma 3 like) BPE with byte fallback, wrapped in a fast tokenizer.

    ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <start_of_turn>, 5 <end_of_turn>,
    6..261 <0x00>..<0xFF> (ordinary vocab entries, as in Gemma), then the learned pieces.
    special_bytes: the <0xNN> pieces are also registered as special added tokens (same ids), as some
    converted SentencePiece tokenizers do, so decoding with skip_special_tokens drops them.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lead = SP_SPECIALS + SP_TURN_MARKERS
    n_bytes = 256
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_bytes,
        special_tokens=lead,
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)

    # Re-number: specials, then the 256 byte tokens as plain vocab entries, then learned pieces.
    spec = json.loads(tok.to_str())
    old_vocab: dict[str, int] = spec["model"]["vocab"]
    vocab: dict[str, int] = {}
    for t in lead:
        vocab[t] = len(vocab)
    for b in range(n_bytes):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(old_vocab.items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
        # Gemma marks the turn markers special too (skipped by skip_special_tokens).
        added["special"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", vocab["<bos>"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        additional_special_tokens=SP_TURN_MARKERS,
        add_bos_token=True,
    )
    fast.chat_template = SP_CHAT_TEMPLATE
    if special_bytes:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(f"<0x{b:02X}>", special=True, normalized=False) for b in range(n_bytes)], special_tokens=True)
    return fast


UNIGRAM_SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
# Every printable ASCII character, and two of Latin-1: "é" known, so "ñ" (which shares its first byte)
# is an unknown character whose bytes are not all foreign to the tokenizer.
UNIGRAM_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + ["é", "ü"]


def build_unigram_tokenizer(vocab_size: int = 500):
    """SentencePiece Unigram without byte fallback, wrapped in a fast tokenizer: a character outside
    its pieces is `<unk>` (one `<unk>` for a run of them), not bytes.

    ids: 0 <pad>, 1 </s>, 2 <s>, 3 <unk>, then the learned pieces. No bos or eos is added to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    # no dummy prefix: text keeps its bytes ("Hello" is not " Hello"), as the sp member's
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=UNIGRAM_SPECIALS,
        unk_token="<unk>",
        initial_alphabet=UNIGRAM_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    # The trainer's piece set is stable, but its EM scores vary from run to run by up to ~2e-3 (the
    # order of its hash maps and threads), which reorders ids and changes the member built on them.
    # Score the pieces by their frequency in the corpus instead: the same member on every machine.
    spec = json.loads(tok.to_str())
    pieces = [p for p, _ in spec["model"]["vocab"] if p not in UNIGRAM_SPECIALS]
    text = "".join(corpus_lines()).replace(" ", "▁")
    counts = {p: text.count(p) + 1 for p in pieces}
    total = sum(counts.values())
    scored = sorted(((p, math.log(c / total)) for p, c in counts.items()), key=lambda ps: (-ps[1], ps[0]))
    spec["model"]["vocab"] = [[p, 0.0] for p in UNIGRAM_SPECIALS] + [[p, s] for p, s in scored]
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = UNIGRAM_CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- models


def build_bpe_model(tokenizer, seed: int = 1234, initializer_range: float = 0.3, extra_logit_rows: int = 0):
    """extra_logit_rows: embedding / logit rows past the tokenizer (as models with padded vocabularies
    have); their output weights are zero, so their logit is 0: never the argmax, but part of the
    softmax normaliser."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer) + extra_logit_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if extra_logit_rows:
        with torch.no_grad():
            model.get_output_embeddings().weight[len(tokenizer) :] = 0
    return model


def build_sp_model(tokenizer, seed: int = 7, initializer_range: float = 0.3, sliding_window: int = 512):
    """sliding_window below 512: a sliding-window layer then a full-attention one, as Gemma 3
    alternates them (its window is 512 tokens), so the window bites on short prompts."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ids = tokenizer.convert_tokens_to_ids
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=None if sliding_window >= 512 else ["sliding_attention", "full_attention"],
        initializer_range=initializer_range,
        bos_token_id=ids("<bos>"),
        eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
        pad_token_id=ids("<pad>"),
        # Untied: with Gemma's scaled, tied embeddings a random model just repeats its input.
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    return model


def build_unigram_model(tokenizer, seed: int = 200, initializer_range: float = 0.3):
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    cfg = Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        bos_token_id=ids("<s>"),
        eos_token_id=ids("</s>"),
        pad_token_id=ids("<pad>"),
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(cfg).eval()


def _save(tokenizer, model, path: Path) -> str:
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def build_member(kind: str, path: str | os.PathLike) -> str:
    """Writes the tiny member ``kind`` into ``path``; returns the path as str.

    kinds: "bpe", "sp", "unigram", "bpe_padded" (the bpe member with 40 logit rows past its tokenizer) and
    "sp_sliding" (the sp member with an 8-token sliding-window layer) and "sp_special_bytes" (the sp
    member, same weights, whose <0xNN> byte tokens its tokenizer also flags special).
    """
    path = Path(path)
    if kind == "bpe":
        tok = build_bpe_tokenizer()
        model = build_bpe_model(tok)
    elif kind == "bpe_padded":
        tok = build_bpe_tokenizer()
        model = build_bpe_model(tok, extra_logit_rows=40)
    elif kind == "sp":
        tok = build_sp_tokenizer()
        model = build_sp_model(tok)
    elif kind == "unigram":
        tok = build_unigram_tokenizer()
        model = build_unigram_model(tok)
    elif kind == "sp_special_bytes":
        tok = build_sp_tokenizer(special_bytes=True)
        model = build_sp_model(tok)
    elif kind == "sp_sliding":
        tok = build_sp_tokenizer()
        model = build_sp_model(tok, sliding_window=8)
    else:
        raise ValueError(f"unknown tiny member kind {kind!r}; use 'bpe', 'sp', 'unigram', 'bpe_padded', 'sp_sliding' or 'sp_special_bytes'")
    return _save(tok, model, path)


def build_all(root: str | os.PathLike) -> dict[str, str]:
    root = Path(root)
    return {kind: build_member(kind, root / kind) for kind in ("bpe", "sp", "unigram")}


if __name__ == "__main__":  # python tests/tiny_models.py /tmp/tiny
    import sys

    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rlae_tiny_models"))

"""Tiny lm-eval tasks for tests: real task YAMLs over local JSONL files, written at fixture time.

``write_tiny_tasks(root)`` writes, under ``root``:

- ``tiny_gen``   generate_until: "Q: 12+7=\\nA:", until "\\n", max_gen_toks 16, exact_match
- ``tiny_mc``    multiple_choice: 3-5 choices, acc / acc_norm
- ``tiny_roll``  loglikelihood_rolling: short texts (unicode, emoji, CJK, tabs, runs of spaces),
                 plus one long text that needs several windows of a 512-token model; word/byte
                 perplexity, bits_per_byte
- ``tiny_gen_shuf``, ``tiny_mc_shuf``, ``tiny_roll_shuf``: the same docs in another order

``tiny_gen`` and ``tiny_mc`` have a train split too (the same docs), for training code.
Every doc has an ``id`` field; compare per-sample results across orders by ``sample["doc"]["id"]``.
Load with ``lm_eval.tasks.TaskManager(include_path=root)``. ``generate(lm, prompts)`` sends greedy
generation requests straight to a harness LM (``--model hf`` or ``rlae``), without a task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GEN_DOCS = [
    {"question": "12+7=", "answer": "19"},
    {"question": "3+5=", "answer": "8"},
    {"question": "40-15=", "answer": "25"},
    {"question": "6*7=", "answer": "42"},
    {"question": "100/4=", "answer": "25"},
    {"question": "81-27=", "answer": "54"},
    {"question": "What is 2 times 2?", "answer": "4"},
    {"question": "Say hello in Chinese: 你好 or 🤗?", "answer": "你好"},
]

# " day" (bpe), " the" (sp) and " man" (unigram) are the tiny members' greedy continuations of three of
# these prompts, so is_greedy is True somewhere for each member.
MC_DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Rome", "Berlin"], "label": 0},
    {"question": "Which animal says \"moo\"?", "choices": ["The dog.", "The cow.", "the"], "label": 1},
    {"question": "How many legs does a spider have?", "choices": ["Six", "Four", "Eight"], "label": 2},
    {"question": "12 + 12 =", "choices": ["24", "21", "144", "1212"], "label": 0},
    {"question": "Water freezes at", "choices": ["0 degrees", "100 degrees", "50 degrees"], "label": 0},
    {"question": "Which one is a color?", "choices": ["Monday", "purple", "seven", "day"], "label": 1},
    {"question": "Pick the greeting:", "choices": ["再见", "你好 👋", "谢谢"], "label": 1},
    {"question": "The sun is a", "choices": ["planet", "moon", "star", "comet", "man"], "label": 2},
]

_LONG = (
    "Once upon a time, there was a little house on a hill. In the house lived an old man, his cat, "
    "and a very loud clock. Every morning at 7:30 the clock rang; every evening the cat sat by the "
    "window and watched the birds fly home. "
)
ROLL_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Hello, world! 🤗 Emoji 😀👍🏽 and CJK 你好，世界 and café naïve."},
    {"text": "tabs\tand\t\ttabs,   runs of spaces,\n\nnewlines\r\nand a trailing space "},
    {"text": "Q: 12+7=\nA: 19\nQ: 3+5=\nA: 8"},
    {"text": "x"},
    {"text": "Ünïcödé ✓ — “quotes” … 𝔘𝔫𝔦 ﷽ 🇫🇷"},
    # Several 512-token windows for both tiny tokenizers (byte fallback makes the CJK long).
    {"text": _LONG * 4 + "世界和平。" * 40 + "\n" + _LONG * 2},
]


def _with_ids(docs: list[dict], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", **d} for i, d in enumerate(docs)]


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _shuffled(docs: list[dict], seed: int) -> list[dict]:
    """A deterministic permutation that moves every doc (a cyclic shift of a shuffle)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    # Derangement: doc order[i] goes to position of order[i+1], so no doc keeps its index.
    out = [None] * len(docs)
    for i in range(len(docs)):
        out[order[(i + 1) % len(docs)]] = docs[order[i]]
    return out


_GEN_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {data}
test_split: test
training_split: train
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until:
    - "\\n"
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
metadata:
  version: 1.0
"""

_MC_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {data}
test_split: test
training_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_ROLL_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

TASKS = ("tiny_gen", "tiny_mc", "tiny_roll")
SHUFFLED = {t: f"{t}_shuf" for t in TASKS}


def write_tiny_tasks(root: str | Path) -> str:
    """Writes the tiny task YAMLs and their JSONL data into ``root``; returns ``root`` as str."""
    root = Path(root).resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    sets = {
        "tiny_gen": (_GEN_YAML, _with_ids(GEN_DOCS, "g")),
        "tiny_mc": (_MC_YAML, _with_ids(MC_DOCS, "m")),
        "tiny_roll": (_ROLL_YAML, _with_ids(ROLL_DOCS, "r")),
    }
    for k, (name, (tmpl, docs)) in enumerate(sets.items()):
        for task, rows in ((name, docs), (SHUFFLED[name], _shuffled(docs, seed=k + 1))):
            data = root / "data" / f"{task}.jsonl"
            _write_jsonl(data, rows)
            (root / f"{task}.yaml").write_text(
                tmpl.format(name=task, data=json.dumps(str(data))), encoding="utf-8"
            )
    return str(root)


def generate(lm, prompts: list[str], until: tuple[str, ...] = ("\n",), max_gen_toks: int = 16, **extra) -> list[str]:
    """Greedy ``generate_until`` answers of a harness LM for ``prompts``, in order (extra: more gen_kwargs)."""
    from lm_eval.api.instance import Instance

    gen_kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False, **extra}
    return lm.generate_until([Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)])


if __name__ == "__main__":  # python tests/tiny_tasks.py /tmp/tiny_tasks
    import sys

    print(write_tiny_tasks(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rlae_tiny_tasks"))

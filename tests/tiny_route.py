"""Tiny harness tasks on which the right member depends on the kind of input: what an RLAE agent
must learn, built from the tiny members themselves.

Two kinds of prompt, "Q: 12+7=\\nA:" (sums) and "Story: the cat sat\\nNext:" (stories). Each
candidate document is scored (multiple choice) or decoded (generation) by each member alone; only
documents where the two members disagree are kept, and the gold answer is the first member's on
sums and the second member's on stories. So each member alone is right on one kind and wrong on the
other, a fixed weighting cannot be right on both, and an agent that reads the input can.

``write_route_tasks(root, members)`` writes ``route_mc`` and ``route_gen`` (YAML + JSONL with
train / validation / test splits) and returns ``root``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = ["cat", "dog", "sun", "tree", "house", "bird", "milk", "bread", "clock", "hill", "window", "apple"]
CHOICES = [" cat", " dog", " 19", " 8", " the", " red", " home", " 42"]
SPLITS = {"train": 0.6, "validation": 0.15, "test": 0.25}

_MC_YAML = """\
task: route_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/route_mc.train.jsonl
    validation: {root}/route_mc.validation.jsonl
    test: {root}/route_mc.test.jsonl
training_split: train
validation_split: validation
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_GEN_YAML = """\
task: route_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/route_gen.train.jsonl
    validation: {root}/route_gen.validation.jsonl
    test: {root}/route_gen.test.jsonl
training_split: train
validation_split: validation
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until:
    - "\\n"
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z0-9]+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _prompts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(("sum", f"Q: {rng.randint(1, 99)}+{rng.randint(1, 99)}=\nA:"))
        else:
            out.append(("story", f"Story: the {rng.choice(WORDS)} and the {rng.choice(WORDS)} {rng.choice(['sat', 'ran', 'slept'])}\nNext:"))
    return out


def _first_word(text: str) -> str:
    """What the task's `word` filter extracts."""
    match = re.search(r"([A-Za-z0-9]+)", text)
    return match.group(1) if match else ""


def _split(docs: list[dict]) -> dict[str, list[dict]]:
    """Stratified by kind, so every split has both kinds in the same proportion."""
    out = {split: [] for split in SPLITS}
    for kind in ("sum", "story"):
        of_kind = [d for d in docs if d["kind"] == kind]
        start = 0
        for split, share in SPLITS.items():
            end = len(of_kind) if split == "test" else start + round(share * len(of_kind))
            out[split] += of_kind[start:end]
            start = end
    return out


def write_route_tasks(root: str | Path, members: list[str], n_mc: int = 600, n_gen: int = 200, seed: int = 0) -> str:
    import torch

    from lm_eval_rlae.engine.fusion import Decoding, Generation
    from lm_eval_rlae.lm import RLAELM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    engine = RLAELM(members=list(members), device="cpu").engine
    one_hot = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]

    mc = []
    candidates = [(kind, prompt, rng.sample(CHOICES, 2)) for kind, prompt in _prompts(rng, n_mc)]
    scored = engine.score([(prompt, choice) for _, prompt, choices in candidates for choice in choices])  # M x [2N]
    for i, (kind, prompt, choices) in enumerate(candidates):
        picks = [int(per_member[2 * i + 1].token_logprobs.sum() > per_member[2 * i].token_logprobs.sum()) for per_member in scored]
        if picks[0] != picks[1]:
            mc.append({"kind": kind, "prompt": prompt, "choices": choices, "label": picks[0] if kind == "sum" else picks[1]})

    gen = []
    decoding = Decoding(until=["\n"], max_gen_toks=4)
    prompts = _prompts(rng, n_gen)
    texts = []
    for weights in one_hot:  # each member alone, all prompts in one batch
        generation = Generation(engine, [prompt for _, prompt in prompts], decoding)
        while not generation.done:
            generation.advance(weights.expand(len(prompts), -1), 4)
        texts.append([_first_word(text.split("\n")[0]) for text in generation.texts()])
    for (kind, prompt), first, second in zip(prompts, *texts):
        if first != second and first and second:
            gen.append({"kind": kind, "prompt": prompt, "answer": first if kind == "sum" else second})

    for name, docs, template in (("route_mc", mc, _MC_YAML), ("route_gen", gen, _GEN_YAML)):
        for split, part in _split(docs).items():
            with open(root / f"{name}.{split}.jsonl", "w") as f:
                for i, doc in enumerate(part):
                    f.write(json.dumps({"id": f"{split}{i}", **doc}) + "\n")
        (root / f"{name}.yaml").write_text(template.format(root=root))
    return str(root)

"""Tiny harness tasks on which the right member depends on the kind of input: what an RLAE agent
must learn, built from the tiny members themselves.

One kind of prompt per member: "Q: 12+7=\\nA:" (sums, the first member's), "Story: the cat
sat\\nNext:" (stories, the second's) and, with a third member, "Colors: red, blue\\nThen:" (its
own). Each candidate document is scored (multiple choice) or decoded (generation) by each member
alone; only documents where the member of its kind disagrees with every other member are kept, and
the gold answer is that member's. So each member alone is right on its kind and wrong on the others,
a fixed weighting cannot be right on all, and an agent that reads the input can.

``write_route_tasks(root, members)`` writes ``route_mc`` and ``route_gen`` (YAML + JSONL with
train / validation / test splits), and ``route_mc_<kind>`` (the documents of one kind: a task on which
one member alone is always right), and returns ``root``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = ["cat", "dog", "sun", "tree", "house", "bird", "milk", "bread", "clock", "hill", "window", "apple"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown"]
KINDS = ("sum", "story", "colors")  # the kind of prompt member m is right on: KINDS[m]
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


def _prompts(rng: random.Random, n: int, n_kinds: int) -> list[tuple[int, str]]:
    """(the member right on it, prompt), kinds in turn."""
    out = []
    for i in range(n):
        kind = i % n_kinds
        if kind == 0:
            out.append((kind, f"Q: {rng.randint(1, 99)}+{rng.randint(1, 99)}=\nA:"))
        elif kind == 1:
            out.append((kind, f"Story: the {rng.choice(WORDS)} and the {rng.choice(WORDS)} {rng.choice(['sat', 'ran', 'slept'])}\nNext:"))
        else:
            out.append((kind, f"Colors: {rng.choice(COLORS)}, {rng.choice(COLORS)}\nThen:"))
    return out


def _first_word(text: str) -> str:
    """What the task's `word` filter extracts."""
    match = re.search(r"([A-Za-z0-9]+)", text)
    return match.group(1) if match else ""


def _split(docs: list[dict]) -> dict[str, list[dict]]:
    """Stratified by kind, so every split has every kind in the same proportion."""
    out = {split: [] for split in SPLITS}
    for kind in KINDS:
        of_kind = [d for d in docs if d["kind"] == kind]
        start = 0
        for split, share in SPLITS.items():
            end = len(of_kind) if split == "test" else start + round(share * len(of_kind))
            out[split] += of_kind[start:end]
            start = end
    return out


def _right_alone(answers: list, right: int) -> bool:
    """Whether the member right on this kind answers unlike every other member."""
    return all(answer != answers[right] for m, answer in enumerate(answers) if m != right)


def write_route_tasks(root: str | Path, members: list[str], n_mc: int = 600, n_gen: int = 200, seed: int = 0) -> str:
    """Two or three members (one kind of prompt each); n_mc / n_gen candidate documents, of which
    those a single member gets right are kept."""
    import torch

    from lm_eval_rlae.engine.fusion import Decoding, Generation
    from lm_eval_rlae.lm import RLAELM

    if not 2 <= len(members) <= len(KINDS):
        raise ValueError(f"route tasks are built for 2 to {len(KINDS)} members, not {len(members)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    engine = RLAELM(members=list(members), device="cpu").engine
    n = len(members)

    mc = []
    candidates = [(right, prompt, rng.sample(CHOICES, 2)) for right, prompt in _prompts(rng, n_mc, n)]
    scored = engine.score([(prompt, choice) for _, prompt, choices in candidates for choice in choices])  # M x [2N]
    for i, (right, prompt, choices) in enumerate(candidates):
        picks = [int(per_member[2 * i + 1].token_logprobs.sum() > per_member[2 * i].token_logprobs.sum()) for per_member in scored]
        if _right_alone(picks, right):
            mc.append({"kind": KINDS[right], "prompt": prompt, "choices": choices, "label": picks[right]})

    gen = []
    decoding = Decoding(until=["\n"], max_gen_toks=4)
    prompts = _prompts(rng, n_gen, n)
    texts = []
    for weights in torch.eye(n)[:, None]:  # each member alone, all prompts in one batch
        generation = Generation(engine, [prompt for _, prompt in prompts], decoding)
        while not generation.done:
            generation.advance(weights.expand(len(prompts), -1), 4)
        texts.append([_first_word(text.split("\n")[0]) for text in generation.texts()])
    for (right, prompt), *answers in zip(prompts, *texts):
        if all(answers) and _right_alone(answers, right):
            gen.append({"kind": KINDS[right], "prompt": prompt, "answer": answers[right]})

    by_kind = [(f"route_mc_{kind}", [doc for doc in mc if doc["kind"] == kind], _MC_YAML.replace("route_mc", f"route_mc_{kind}")) for kind in KINDS[:n]]
    for name, docs, template in (("route_mc", mc, _MC_YAML), ("route_gen", gen, _GEN_YAML), *by_kind):
        for split, part in _split(docs).items():
            with open(root / f"{name}.{split}.jsonl", "w") as f:
                for i, doc in enumerate(part):
                    f.write(json.dumps({"id": f"{split}{i}", **doc}) + "\n")
        (root / f"{name}.yaml").write_text(template.format(root=root))
    return str(root)

"""The tiny members and tasks that the runtime tests rely on are what they claim to be."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

import text_strategies
import tiny_tasks


@pytest.fixture(scope="module")
def paths(bpe_member, sp_member, unigram_member):
    return {"bpe": bpe_member, "sp": sp_member, "unigram": unigram_member}


@pytest.fixture(scope="module")
def tokenizers(paths):
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(p) for k, p in paths.items()}


@pytest.fixture(scope="module")
def models(paths):
    from transformers import AutoModelForCausalLM

    return {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in paths.items()}


def test_three_different_tokenizer_families(tokenizers, models):
    bpe, sp, unigram = tokenizers["bpe"], tokenizers["sp"], tokenizers["unigram"]
    assert type(bpe.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    assert type(bpe.backend_tokenizer.decoder).__name__ == "ByteLevel"
    sp_model = sp.backend_tokenizer.model
    assert type(sp_model).__name__ == "BPE" and sp_model.byte_fallback
    assert all(f"<0x{b:02X}>" in sp.get_vocab() for b in range(256))
    assert bpe.eos_token == "<|endoftext|>" and bpe.bos_token == "<|endoftext|>"
    assert (sp.bos_token, sp.eos_token, sp.pad_token, sp.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert sp.encode("hi")[0] == sp.bos_token_id  # bos added like Gemma
    assert bpe.encode("hi")[0] != bpe.bos_token_id
    assert 400 <= len(bpe) <= 600 and 400 <= len(sp) <= 700
    assert type(models["bpe"]).__name__ == "LlamaForCausalLM"
    assert type(models["sp"]).__name__ == "Gemma3ForCausalLM"
    # the third: Unigram without byte fallback, "<unk>" for what it cannot spell, a third architecture
    unigram_model = unigram.backend_tokenizer.model
    assert type(unigram_model).__name__ == "Unigram" and not json.loads(unigram.backend_tokenizer.to_str())["model"]["byte_fallback"]
    assert type(unigram.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    assert not any(p.startswith("<0x") for p in unigram.get_vocab()) and 400 <= len(unigram) <= 600
    assert unigram.convert_ids_to_tokens(unigram.encode("a 你好\tb", add_special_tokens=False)) == ["a", "▁", "<unk>", "b"]  # a run fused
    assert unigram.decode(unigram.encode("a 你好\tb"), skip_special_tokens=True) == "a b"
    assert type(models["unigram"]).__name__ == "Olmo2ForCausalLM"
    # a piece the two families spell differently
    assert bpe.convert_ids_to_tokens(bpe.encode(" the"))[0].startswith("Ġ")
    assert sp.convert_ids_to_tokens(sp.encode(" the", add_special_tokens=False))[0].startswith("▁")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_decode_encode_round_trips_unicode(tokenizers, kind):
    tok = tokenizers[kind]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text_strategies.text)
    def check(t):
        if kind == "sp":
            t = t.replace("▁", "_")  # SentencePiece maps a literal U+2581 to a space, as Gemma does
        ids = tok.encode(t)
        assert tok.decode(ids, skip_special_tokens=True) == t

    check()


def test_chat_templates_differ_and_render(tokenizers):
    msgs = [{"role": "user", "content": "Q: 1+1="}]
    out = {k: t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) for k, t in tokenizers.items()}
    assert out["bpe"] == "<|im_start|>user\nQ: 1+1=<|im_end|>\n<|im_start|>assistant\n"
    assert out["sp"] == "<bos><start_of_turn>user\nQ: 1+1=<end_of_turn>\n<start_of_turn>model\n"
    assert out["unigram"] == "<s>[INST] Q: 1+1= [/INST]"
    for k, t in tokenizers.items():
        special = set(t.all_special_tokens)
        markers = {"bpe": ["<|im_start|>", "<|im_end|>"], "sp": ["<start_of_turn>", "<end_of_turn>"], "unigram": ["<s>", "</s>"]}[k]
        assert special.issuperset(markers)


def test_tokenizers_build_the_same_on_every_run():
    """The members are rebuilt by every test session on every machine; a tokenizer trainer that is not
    deterministic (the Unigram trainer's scores vary with its hash-map order) gives another member."""
    import tiny_models

    for build in (tiny_models.build_bpe_tokenizer, tiny_models.build_sp_tokenizer, tiny_models.build_unigram_tokenizer):
        first, second = (json.loads(build().backend_tokenizer.to_str())["model"]["vocab"] for _ in range(2))
        assert first == second, f"{build.__name__} gave two vocabularies"


@pytest.mark.parametrize("kind", ["bpe", "sp", "unigram"])
def test_greedy_paths_have_no_near_ties(tokenizers, models, kind):
    """Greedy generations must not flip under batching noise: top-1 vs top-2 gaps stay clear."""
    import torch

    tok, model = tokenizers[kind], models[kind]
    min_gap = float("inf")
    for doc in tiny_tasks.GEN_DOCS:
        prompt = f"Q: {doc['question']}\nA:"
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
            logits = model(out).logits[0, ids.shape[1] - 1 :]
        top2 = logits.topk(2, dim=-1).values
        min_gap = min(min_gap, (top2[:, 0] - top2[:, 1]).min().item())
    assert min_gap > 1e-3, f"{kind}: near-tie on a greedy path (gap {min_gap:.2e}); change the seed"


@pytest.mark.parametrize("kind", ["bpe", "sp", "unigram"])
def test_tiny_tasks_run_with_hf(run_eval, paths, kind):
    path = paths[kind]
    res = run_eval("hf", {"pretrained": path, "device": "cpu"}, ["tiny_gen", "tiny_mc", "tiny_roll"])
    assert len(res["tiny_gen"]) == len(tiny_tasks.GEN_DOCS)
    assert len(res["tiny_mc"]) == len(tiny_tasks.MC_DOCS)
    assert len(res["tiny_roll"]) == len(tiny_tasks.ROLL_DOCS)
    for s in res["tiny_gen"].values():
        assert isinstance(s["filtered_resps"][0], str)
        assert "\n" not in s["filtered_resps"][0]
    for doc_id, s in res["tiny_mc"].items():
        assert len(s["filtered_resps"]) == len(s["doc"]["choices"])
        assert all(ll < 0 for ll, _ in s["filtered_resps"])
    # is_greedy comparisons are not vacuous: some choice is the member's greedy continuation
    assert any(greedy for s in res["tiny_mc"].values() for _, greedy in s["filtered_resps"])
    for s in res["tiny_roll"].values():
        assert s["filtered_resps"][0] < 0
    agg = res["__results__"]
    assert 0 <= agg["tiny_mc"]["acc,none"] <= 1
    assert agg["tiny_roll"]["bits_per_byte,none"] > 0


def test_shuffled_tasks_hold_the_same_docs_in_another_order(tiny_tasks_dir):
    import json
    from pathlib import Path

    for task in tiny_tasks.TASKS:
        rows = [json.loads(line) for line in Path(tiny_tasks_dir, "data", f"{task}.jsonl").read_text().splitlines()]
        shuf = [
            json.loads(line)
            for line in Path(tiny_tasks_dir, "data", f"{task}_shuf.jsonl").read_text().splitlines()
        ]
        assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, shuf))
        assert all(a["id"] != b["id"] for a, b in zip(rows, shuf))

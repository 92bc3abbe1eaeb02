"""The specialist-adapter trainer (trainer/specialists/build.py) on the tiny members and tiny tasks, and
base + adapter members: rlae with a peft member equals `--model hf` with the same adapter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_rlae.offline import presets
from trainer.specialists import build as specialists
from trainer.specialists.build import SpecialistConfig, batch_schedule, build, collate


@pytest.mark.parametrize("member", ["bpe_member", "sp_member"])
def test_padded_batch_loss_is_the_mean_answer_loss_of_each_example_alone(member, request):
    """Left padding, explicit positions and logits_to_keep change nothing: the batched loss equals
    the answer-token cross-entropy of every example run alone without padding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(member), dtype=torch.float32).eval()
    encoded = [([5, 9, 14, 3, 7, 11], 2), ([8, 4], 1), ([12, 6, 9, 10], 3)]  # (ids, n_answer)
    input_ids, attention_mask, position_ids, labels = collate(encoded, [0, 1, 2], pad_id=0)
    assert labels.shape == (3, 3)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=labels.shape[1] + 1
        ).logits
        batched = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        losses = []
        for ids, n in encoded:
            alone = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
            logprobs = alone[:-1].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            losses.extend((-logprobs[-n:]).tolist())
    assert batched.item() == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_batch_schedule_is_seeded_covers_every_example_and_keeps_the_token_budget():
    lengths = [3 + (i * 7) % 40 for i in range(200)]
    schedule = batch_schedule(lengths, steps=60, batch_tokens=128, seed=1)
    assert schedule == batch_schedule(lengths, steps=60, batch_tokens=128, seed=1)
    assert schedule != batch_schedule(lengths, steps=60, batch_tokens=128, seed=2)
    for batch in schedule:
        assert len(batch) * max(lengths[i] for i in batch) <= 128
    first_epoch, seen = [], set()
    for batch in schedule:
        if seen.issuperset(batch):
            break
        first_epoch.extend(batch)
        seen.update(batch)
    assert sorted(first_epoch) == list(range(200))  # each epoch: every example once


@pytest.fixture(scope="module")
def tiny_config(bpe_member):
    return SpecialistConfig(
        name="tiny-specialist",
        base=bpe_member,
        tasks=("tiny_gen", "tiny_mc"),
        steps=8,
        batch_tokens=96,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=2,
        seed=7,
    )


@pytest.fixture(scope="module")
def tiny_adapter(tiny_config, tiny_tasks_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("specialist")
    return build(tiny_config, root / "adapters", root / "work", include_path=tiny_tasks_dir)


def test_build_writes_a_peft_adapter_that_lowers_the_answer_loss_on_its_tasks(tiny_adapter, tiny_config, tiny_tasks_dir):
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    files = {p.name for p in tiny_adapter.iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json", "training_config.json"}
    weights = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float16 for w in weights.values())
    assert json.loads((tiny_adapter / "training_config.json").read_text())["config"]["tasks"] == list(tiny_config.tasks)

    lm = HFLM(pretrained=tiny_config.base, device="cpu", dtype="float32", batch_size=1)
    encoded = specialists.encode(lm, specialists.task_examples(tiny_config.tasks, 100, tiny_tasks_dir))
    input_ids, attention_mask, position_ids, labels = collate(encoded, range(len(encoded)), pad_id=0)

    def answer_loss(model):
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=labels.shape[1] + 1
            ).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100).item()

    before = answer_loss(lm.model)
    after = answer_loss(PeftModel.from_pretrained(lm.model, str(tiny_adapter)))
    assert after < before - 1.0, (before, after)


def test_an_interrupted_build_resumes_from_its_checkpoint_to_the_same_adapter(
    tiny_adapter, tiny_config, tiny_tasks_dir, tmp_path, monkeypatch
):
    calls = []

    def lr_then_crash(config, step):
        calls.append(step)
        if step == 5:  # killed during step 6, after the checkpoint at step 4
            raise KeyboardInterrupt
        return specialists_lr(config, step)

    specialists_lr = specialists.learning_rate
    monkeypatch.setattr(specialists, "learning_rate", lr_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_config, tmp_path / "adapters", tmp_path / "work", include_path=tiny_tasks_dir)
    assert not (tmp_path / "adapters" / tiny_config.name).exists()
    monkeypatch.setattr(specialists, "learning_rate", specialists_lr)

    calls.clear()
    monkeypatch.setattr(specialists, "learning_rate", lambda c, s: calls.append(s) or specialists_lr(c, s))
    resumed = build(tiny_config, tmp_path / "adapters", tmp_path / "work", include_path=tiny_tasks_dir)
    assert calls == [4, 5, 6, 7]  # only the steps after the checkpoint ran again
    expected = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_another_configuration_is_refused(tiny_config, tiny_tasks_dir, tmp_path, monkeypatch):
    one_step = dataclasses.replace(tiny_config, steps=2, checkpoint_every=1)
    monkeypatch.setattr(specialists, "_export", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build(one_step, tmp_path / "adapters", tmp_path / "work", include_path=tiny_tasks_dir)
    with pytest.raises(ValueError, match="another configuration.*--restart"):
        build(dataclasses.replace(one_step, lr=1e-3), tmp_path / "adapters", tmp_path / "work", include_path=tiny_tasks_dir)


def test_rlae_with_a_base_plus_adapter_member_equals_hf_with_that_adapter(tiny_adapter, bpe_member, run_eval):
    """Any base + peft adapter pair is a member; one such member alone is `--model hf` with `peft=`."""
    adapter = str(tiny_adapter)
    hf = run_eval("hf", f"pretrained={bpe_member},peft={adapter},dtype=float32,device=cpu", ["tiny_mc"])["tiny_mc"]
    rlae = run_eval("rlae", {"members": [{"pretrained": bpe_member, "peft": adapter}]}, ["tiny_mc"])["tiny_mc"]
    base = run_eval("hf", f"pretrained={bpe_member},dtype=float32,device=cpu", ["tiny_mc"])["tiny_mc"]
    largest_change = 0.0
    for doc_id, sample in hf.items():
        ours = [r[0] for r in rlae[doc_id]["filtered_resps"]]
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-4)
        plain = [r[0] for r in base[doc_id]["filtered_resps"]]
        largest_change = max(largest_change, max(abs(a - b) for a, b in zip(theirs, plain)))
    assert largest_change > 1e-2  # the adapter is really applied


def test_a_specialist_preset_without_its_adapter_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "ADAPTERS_DIR", tmp_path)
    with pytest.raises(presets.PresetUnavailableError, match="rlae-build-specialists smollm2-135m-math"):
        presets.specialist_adapter("smollm2-135m-math")
    assert presets.specialist_adapter("smollm2-135m") is None


@pytest.mark.parametrize("name", sorted(specialists.SPECIALISTS))
def test_committed_adapters_were_built_by_the_current_configuration(name):
    """The committed adapter is what `rlae-build-specialists NAME` builds now (else: rebuild it)."""
    adapter = presets.ADAPTERS_DIR / name
    record = json.loads((adapter / "training_config.json").read_text())
    assert record["config"] == json.loads(json.dumps(dataclasses.asdict(specialists.SPECIALISTS[name])))
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == presets.SPECIALIST_PRESETS[name]
    assert peft_config["r"] == record["config"]["lora_r"]


def test_the_table_routes_each_task_to_its_better_specialist_and_averages_each_skill_set(tmp_path):
    from trainer.specialists import table as specialist_table

    math, lang = specialists.SPECIALISTS
    tasks = {name: specialists.SPECIALISTS[name].tasks for name in (math, lang)}
    own, other = 0.8, 0.3

    def accuracies(strong: str):
        return {
            (t, "acc,none"): (own if name == strong else other, 40) for name in (math, lang) for t in tasks[name]
        }

    results = {f"hf {math}": accuracies(math), f"hf {lang}": accuracies(lang), "rlae uniform": accuracies(None)}
    markdown, scores = specialist_table.table(results, limit=40)
    assert all(v == own for v in scores["oracle routing"].values())
    assert all(v == other for v in scores["uniform ensemble"].values())
    assert f"| **{math}** | **mean of {len(tasks[math])} tasks** | | **80.0** | **30.0** | **30.0** | **80.0** |" in markdown
    specialist_table.plot(scores, tmp_path / "table.png")
    assert (tmp_path / "table.png").stat().st_size > 10_000

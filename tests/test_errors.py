"""Bad configurations and unsupported requests fail with a ValueError that names the problem and
says what to change."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

MISSING = "/nonexistent/rlae-test/no-such-model"
HUB_ID = "rlae-test-no-such-org/no-such-model-xyz"


def rlae_class():
    from lm_eval.api.registry import get_model

    return get_model("rlae")


@pytest.fixture(scope="module")
def one_member_lm(bpe_member):
    return rlae_class()(members=[bpe_member], device="cpu")


@pytest.mark.parametrize("members", [None, [], "[]", ""])
def test_no_members(members):
    with pytest.raises(ValueError, match=r"(?i)members"):
        rlae_class()(members=members, device="cpu")


def test_no_members_from_arg_string():
    with pytest.raises(ValueError, match=r"(?i)members"):
        rlae_class().create_from_arg_string("weights=uniform", {"device": "cpu"})


@pytest.mark.parametrize("name", [MISSING, HUB_ID])
def test_unknown_member(bpe_member, name):
    with pytest.raises(ValueError) as info:
        rlae_class()(members=[bpe_member, name], device="cpu")
    message = str(info.value)
    assert name in message, message  # names the member at fault
    assert "members" in message  # and where to fix it


def test_unknown_member_from_the_command_line_form(bpe_member):
    with pytest.raises(ValueError, match=MISSING.replace("/", r"\/")):
        rlae_class().create_from_arg_string(f"members=[{bpe_member},{MISSING}]", {"device": "cpu"})


@pytest.mark.parametrize("weights", [[1.0], [0.2, 0.3, 0.5], "[1]", "[0.2,0.3,0.5]"])
def test_weights_of_the_wrong_length(bpe_member, sp_member, weights):
    with pytest.raises(ValueError) as info:
        rlae_class()(members=[bpe_member, sp_member], weights=weights, device="cpu")
    message = str(info.value)
    assert "weight" in message and "2" in message and "member" in message, message


@pytest.mark.parametrize("weights", [[-1.0, 2.0], "[0.5,-0.5]"])
def test_negative_weights(bpe_member, sp_member, weights):
    with pytest.raises(ValueError, match=r"(?i)weight.*(negative|>= ?0|non-negative)"):
        rlae_class()(members=[bpe_member, sp_member], weights=weights, device="cpu")


@pytest.mark.parametrize("weights", [[0, 0], "[0,0]", [0.0, 0.0]])
def test_weights_summing_to_zero(bpe_member, sp_member, weights):
    with pytest.raises(ValueError, match=r"(?i)weight.*(zero|sum|positive)"):
        rlae_class()(members=[bpe_member, sp_member], weights=weights, device="cpu")


@pytest.mark.parametrize("weights", ["bogus", "[a,b]", [float("nan"), 1.0], [float("inf"), 1.0]])
def test_weights_that_are_not_numbers(bpe_member, sp_member, weights):
    with pytest.raises(ValueError, match=r"(?i)weight"):
        rlae_class()(members=[bpe_member, sp_member], weights=weights, device="cpu")


@pytest.mark.parametrize("span_length", [0, -3, "0"])
def test_span_length_below_one(bpe_member, span_length):
    with pytest.raises(ValueError, match=r"span_length"):
        rlae_class()(members=[bpe_member], span_length=span_length, device="cpu")


def test_span_length_from_arg_string(bpe_member):
    with pytest.raises(ValueError, match=r"span_length"):
        rlae_class().create_from_arg_string(f"members=[{bpe_member}],span_length=0", {"device": "cpu"})


def test_configuration_errors_come_before_loading_any_model():
    """A typo in weights must not cost a (possibly huge) model load first: with members that do not
    exist, the weights error is what is reported, and at once."""
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"(?i)weight"):
        rlae_class()(members=[MISSING, MISSING + "2"], weights=[1.0], device="cpu")
    with pytest.raises(ValueError, match=r"span_length"):
        rlae_class()(members=[MISSING], span_length=0, device="cpu")
    assert time.monotonic() - start < 5


def _instance(request_type, arguments):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0, metadata=("tiny_mm", 0, 1))


def test_multimodal_generation_request_is_refused(one_member_lm):
    request = _instance("generate_until", ("Q: 1+1=\nA:", {"until": ["\n"], "max_gen_toks": 4}, {"visual": ["<image>"]}))
    with pytest.raises(ValueError, match=r"(?i)(image|text-only|multimodal)"):
        one_member_lm.generate_until([request])


def test_multimodal_loglikelihood_request_is_refused(one_member_lm):
    request = _instance("loglikelihood", ("Q: 1+1=\nA:", " 2", {"visual": ["<image>"]}))
    with pytest.raises(ValueError, match=r"(?i)(image|text-only|multimodal)"):
        one_member_lm.loglikelihood([request])


def test_unsupported_generation_arguments_are_named(one_member_lm):
    request = _instance("generate_until", ("Q: 1+1=\nA:", {"until": ["\n"], "max_gen_toks": 4, "num_beams": 4}))
    with pytest.raises(ValueError, match=r"num_beams"):
        one_member_lm.generate_until([request])


def test_max_gen_toks_longer_than_the_member_context(one_member_lm):
    request = _instance("generate_until", ("Q: 1+1=\nA:", {"until": ["\n"], "max_gen_toks": 100_000}))
    with pytest.raises(ValueError, match=r"max_gen_toks"):
        one_member_lm.generate_until([request])


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one(bpe_member, batch_size):
    with pytest.raises(ValueError, match=r"batch_size"):
        rlae_class()(members=[bpe_member], batch_size=batch_size, device="cpu")


# ---------------------------------------------------------------------------- empty texts

ENSEMBLES = {"one": ["bpe"], "copies": ["sp", "sp"], "mixed": ["bpe", "sp"]}


@pytest.fixture(scope="module")
def ensembles(bpe_member, sp_member):
    paths = {"bpe": bpe_member, "sp": sp_member}
    return {label: rlae_class()(members=[paths[k] for k in kinds], device="cpu") for label, kinds in ENSEMBLES.items()}


@pytest.fixture(scope="module")
def hf_members(bpe_member, sp_member):
    from lm_eval.models.huggingface import HFLM

    return {kind: HFLM(pretrained=path, device="cpu") for kind, path in (("bpe", bpe_member), ("sp", sp_member))}


@pytest.mark.parametrize("context", ["Q: 12+7=\nA:", ""])
@pytest.mark.parametrize("label", ENSEMBLES)
def test_an_empty_continuation_is_named(ensembles, hf_members, label, context):
    """hf stops on it (a bare AssertionError, or an IndexError for an empty context): rlae names
    the request and says what to change."""
    request = _instance("loglikelihood", (context, ""))
    for hf in hf_members.values():
        with pytest.raises((AssertionError, IndexError)):
            hf.loglikelihood([request])
    with pytest.raises(ValueError) as info:
        ensembles[label].loglikelihood([_instance("loglikelihood", ("Q: 1+1=\nA:", " 2")), request])
    message = str(info.value)
    assert repr(context[-60:]) in message and "continuation ''" in message and "target_delimiter" in message, message


@pytest.mark.parametrize("label", ENSEMBLES)
def test_a_continuation_that_is_the_context_s_trailing_space_is_scored_as_hf(ensembles, hf_members, label):
    """("A: ", "") is ("A:", " ") after the harness moves the context's trailing space."""
    request = _instance("loglikelihood", ("Q: 12+7=\nA: ", ""))
    (got, _), = ensembles[label].loglikelihood([request])
    want = {kind: hf.loglikelihood([request])[0][0] for kind, hf in hf_members.items()}
    kinds = set(ENSEMBLES[label])
    if len(kinds) == 1:
        assert got == pytest.approx(want[kinds.pop()], abs=1e-4)
    else:  # a mixture of the two, at least their mean (Jensen)
        assert max(want.values()) + 1e-4 >= got >= sum(want.values()) / 2 - 1e-4


@pytest.mark.parametrize("label", ENSEMBLES)
def test_an_empty_text_has_the_rolling_loglikelihood_hf_gives(ensembles, hf_members, label):
    """hf scores the tokens its tokenizer gives "": none for bpe (0.0), <bos> for sp."""
    request = _instance("loglikelihood_rolling", ("",))
    want = {kind: hf.loglikelihood_rolling([request])[0] for kind, hf in hf_members.items()}
    assert want["bpe"] == 0 and want["sp"] < 0
    got = ensembles[label].loglikelihood_rolling([request, _instance("loglikelihood_rolling", ("x",))])[0]
    kinds = set(ENSEMBLES[label])
    if len(kinds) == 1:
        assert got == pytest.approx(want[kinds.pop()], abs=1e-4)
    else:  # each member's probability of the empty text, mixed: log(0.5 * 1 + 0.5 * p_sp(<bos>))
        assert got == pytest.approx(math.log(0.5 + 0.5 * math.exp(want["sp"])), abs=1e-4)


# ---------------------------------------------------------------------------- damaged members


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture()
def preset_cache(bpe_member, tmp_path, monkeypatch) -> Path:
    """The tiny bpe member installed as the converted cache of preset smollm2-135m."""
    from lm_eval_rlae.offline import presets

    monkeypatch.setenv("RLAE_CACHE", str(tmp_path / "cache"))
    target = presets.preset_dir("smollm2-135m")
    shutil.copytree(bpe_member, target)
    (target / "rlae_preset.json").write_text(json.dumps({"format": presets.CACHE_FORMAT}))
    return target


def test_a_truncated_member_directory_names_the_file_and_the_fix(bpe_member, sp_member, tmp_path):
    broken = shutil.copytree(sp_member, tmp_path / "sp")
    _truncate(broken / "model.safetensors")
    with pytest.raises(ValueError) as info:
        rlae_class()(members=[bpe_member, str(broken)], device="cpu")
    message = str(info.value)
    assert f"member {str(broken)!r}" in message and f"{broken / 'model.safetensors'} cannot be read" in message, message
    assert "Download it again, or convert it again" in message, message


def test_a_truncated_preset_cache_names_the_file_and_the_command_that_rebuilds_it(preset_cache):
    from lm_eval_rlae.offline.presets import PresetUnavailableError

    assert rlae_class()(members=["smollm2-135m"], device="cpu").members[0].lm.model is not None  # intact, it loads
    _truncate(preset_cache / "model.safetensors")
    with pytest.raises(PresetUnavailableError) as info:
        rlae_class()(members=["smollm2-135m"], device="cpu")
    message = str(info.value)
    assert "'smollm2-135m'" in message and f"{preset_cache / 'model.safetensors'} cannot be read" in message, message
    assert "-m lm_eval_rlae.offline.presets --rebuild smollm2-135m" in message, message


@pytest.mark.parametrize("where", ["directory", "preset"])
def test_a_broken_config_says_what_to_do_with_the_directory(bpe_member, preset_cache, tmp_path, where):
    broken = preset_cache if where == "preset" else shutil.copytree(bpe_member, tmp_path / "bpe")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    name = "smollm2-135m" if where == "preset" else str(broken)
    with pytest.raises(ValueError) as info:
        rlae_class()(members=[name], device="cpu")
    message = str(info.value)
    assert f"member {name!r} from {broken}" in message and "config.json" in message, message
    fix = "--rebuild smollm2-135m" if where == "preset" else "Download it again, or convert it again"
    assert fix in message and "not a preset" not in message, message

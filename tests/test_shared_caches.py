"""Caches and checkpoints shared by processes at once, or damaged on disk.

- Two processes fill one multiple-choice score cache at once (PPO and MAPPO trained side by side):
  afterwards it holds every document of both, each as one process alone computes it, and no document
  was scored twice.
- A damaged score cache entry (truncated, not JSON, another checksum, arrays that disagree with the
  index) is scored again with a warning, never used.
- A damaged training or specialist checkpoint is a clear error; a damaged rlae-compare run is run again.
- Processes resolving one preset at once convert it once.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def scoring(members: list[str], tasks_dir: str):
    """The engine, state features and `tiny_mc` test documents (8) a Run would build a ScoreCache from."""
    from lm_eval_rlae.engine.fusion import FusionEngine
    from lm_eval_rlae.engine.members import Member, MemberSpec
    from lm_eval_rlae.policies import UniformPolicy
    from lm_eval_rlae.policies.state import make_state_features
    from trainer.agents.tasks import TaskMixture

    loaded = [Member(MemberSpec.parse(name, {"device": "cpu"})) for name in members]
    policy = UniformPolicy(len(loaded))
    policy.needs_hidden = True  # as an agent on the `members` state
    engine = FusionEngine(loaded, policy, span_length=2, seed=0)
    (task,) = TaskMixture({"tiny_mc": 1.0}, include_path=tasks_dir, roles=("test",)).load("test").values()
    return engine, make_state_features("members", loaded, engine.union), task


def some(task, first: int, last: int):
    """The task with only its documents [first, last)."""
    part = copy.copy(task)
    part.documents = task.documents[first:last]
    return part


# One process of the race: it scores slowly, and starts when the other is ready, so that without a
# lock both read the empty cache before either writes.
_FILL = """
import json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
from test_shared_caches import scoring, some
from trainer.agents.scores import ScoreCache

engine, features, task = scoring(args["members"], args["tasks_dir"])
scored, original = [], ScoreCache._score
def slow(self, task, documents):
    scored.append(len(documents))
    time.sleep(1.5)
    return original(self, task, documents)
ScoreCache._score = slow
ready = Path(args["ready"])
(ready / str(args["first"])).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
ScoreCache(Path(args["cache"]), engine, features).documents(some(task, args["first"], args["last"]))
print(json.dumps(scored))
"""


@pytest.fixture(scope="module")
def scored_alone(bpe_member, sp_member, tiny_tasks_dir, tmp_path_factory):
    """(engine, features, task) and the 8 documents scored by one process into a cache of its own."""
    from trainer.agents.scores import ScoreCache

    engine, features, task = scoring([bpe_member, sp_member], tiny_tasks_dir)
    return (engine, features, task), ScoreCache(tmp_path_factory.mktemp("alone"), engine, features).documents(task)


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.obs, b.obs, atol=1e-4)
        for choices_a, choices_b in zip(a.scored, b.scored, strict=True):
            for x, y in zip(choices_a, choices_b, strict=True):
                np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
                np.testing.assert_array_equal(x.token_lengths, y.token_lengths)
                assert x.greedy == y.greedy


def _no_scoring(self, task, documents):
    raise AssertionError(f"scored {len(documents)} documents that the cache should hold")


def test_two_processes_filling_one_score_cache_keep_each_others_documents(bpe_member, sp_member, tiny_tasks_dir, tmp_path, scored_alone, monkeypatch):
    from trainer.agents.scores import ScoreCache

    (engine, features, task), alone = scored_alone
    cache, ready = tmp_path / "scores", tmp_path / "ready"
    ready.mkdir()
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FILL, json.dumps({"tests": str(TESTS), "members": [bpe_member, sp_member], "tasks_dir": tiny_tasks_dir,
                                                       "cache": str(cache), "ready": str(ready), "first": first, "last": last})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for first, last in ((0, 5), (3, 8))  # documents 3 and 4 are in both
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    monkeypatch.setattr(ScoreCache, "_score", _no_scoring)
    _assert_same(ScoreCache(cache, engine, features).documents(task), alone)
    scored = [n for stdout, _ in outputs for n in json.loads(stdout.splitlines()[-1])]
    assert sum(scored) == 8, f"documents scored per call: {scored} (the second process scores only what the first did not write)"


def _entry(root: Path) -> list[Path]:
    """The files the cache wrote for tiny_mc's test split (not its lock)."""
    return sorted(root.rglob("tiny_mc.test.*"))


def _rewrite(path: Path, change) -> None:
    """The entry written again with a valid checksum over what `change(index, arrays)` makes of it."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from trainer.agents.scores import _checksum

    with safe_open(str(path), framework="np") as f:
        metadata, arrays = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    index = change(metadata["index"], arrays)
    save_file(arrays, str(path), metadata=metadata | {"index": index, "sha256": _checksum(index, arrays)})


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    if path.suffix == ".json":
        path.write_text("{garbage")
    else:  # the header is JSON too
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"{garbage")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": _truncate,
    "json garbage": _garbage,
    "a byte of the arrays flipped": _flip_last_byte,
    "index not json": lambda path: _rewrite(path, lambda index, arrays: "{garbage"),
    "index disagrees with the arrays": lambda path: _rewrite(path, lambda index, arrays: json.dumps(json.loads(index) | {"keys": json.loads(index)["keys"][:-1]})),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_score_cache_entry_is_scored_again_with_a_warning(damage, tmp_path, scored_alone, monkeypatch, caplog):
    from trainer.agents.scores import ScoreCache

    (engine, features, task), alone = scored_alone
    ScoreCache(tmp_path, engine, features).documents(task)
    entry = _entry(tmp_path)
    for path in entry:
        DAMAGE[damage](path)

    scored, original = [], ScoreCache._score
    monkeypatch.setattr(ScoreCache, "_score", lambda self, task, documents: scored.append(len(documents)) or original(self, task, documents))
    _assert_same(ScoreCache(tmp_path, engine, features).documents(task), alone)
    assert scored == [8]
    warning = next((r.getMessage() for r in caplog.records if r.levelname == "WARNING"), "")
    assert str(entry[0].with_suffix(".safetensors")) in warning and "scored again" in warning, caplog.text

    monkeypatch.setattr(ScoreCache, "_score", _no_scoring)  # and the entry written again is whole
    _assert_same(ScoreCache(tmp_path, engine, features).documents(task), alone)


def test_a_damaged_training_checkpoint_is_a_clear_error(tmp_path):
    from trainer.agents.checkpoint import CheckpointError, load_state, save_state

    state = {"epoch": 3, "optimizer": {0: {"exp_avg": torch.ones(4)}}, "rng": np.arange(3)}
    directory = tmp_path / "checkpoint"
    save_state(directory, state)
    assert load_state(directory)["optimizer"][0]["exp_avg"].tolist() == [1.0] * 4

    os.replace(directory, tmp_path / "checkpoint.old")  # killed between the two renames of a swap
    assert load_state(directory)["epoch"] == 3
    save_state(directory, state | {"epoch": 4})
    assert load_state(directory)["epoch"] == 4

    skeleton = json.loads((directory / "state.json").read_text())
    skeleton["__dict__"].append(["extra", {"__tensor__": "/not/saved"}])
    (directory / "state.json").write_text(json.dumps(skeleton))
    with pytest.raises(CheckpointError, match=r"checkpoint in .*checkpoint is damaged .*'/not/saved'.*--restart"):
        load_state(directory)
    _truncate(directory / "state.safetensors")
    with pytest.raises(CheckpointError, match="damaged.*--restart"):
        load_state(directory)


def test_a_damaged_specialist_checkpoint_is_a_clear_error(tmp_path):
    from trainer.specialists.build import SPECIALISTS, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    config = next(iter(SPECIALISTS.values()))
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, 1, config, [{"step": 1, "loss": 0.5}])
    assert load_checkpoint(tmp_path / "checkpoint", model, optimizer, config) == (1, [{"step": 1, "loss": 0.5}])
    _truncate(tmp_path / "checkpoint" / "state.safetensors")
    with pytest.raises(ValueError, match="checkpoint is damaged .*--restart"):
        load_checkpoint(tmp_path / "checkpoint", model, optimizer, config)


def test_a_damaged_compare_run_is_run_again(tmp_path, caplog):
    from lm_eval_rlae.compare.command import Runs
    from lm_eval_rlae.compare.config import CompareConfig

    runs = Runs(tmp_path, CompareConfig(members=["a", "b"], tasks=["t"]))
    key = runs.key("rlae", "members=[a,b],weights=uniform", "t")
    path = runs.path("uniform", "t")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "scores": {"0": 1.0}})[:30])  # a kill mid-write, before writes were atomic
    assert runs.load("uniform", "t", key) is None
    assert f"{path} is damaged" in caplog.text


def test_processes_resolving_one_preset_at_once_convert_it_once(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from lm_eval_rlae.offline import presets

    monkeypatch.setenv("RLAE_CACHE", str(tmp_path))
    monkeypatch.setattr(presets, "_package_dir", lambda module: Path("."))
    conversions = []

    def convert(preset, out, scratch):
        conversions.append(preset.name)
        time.sleep(0.5)
        save_file({"weights": np.arange(4.0)}, str(out / "model.safetensors"))
        return {"gguf": "x.gguf"}

    monkeypatch.setattr(presets, "_convert", convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(presets.resolve_preset("smollm2-135m"))) for _ in range(3)]
    for thread in threads:  # threads lock one another as processes do (a lock file opened by each)
        thread.start()
    for thread in threads:
        thread.join()
    assert conversions == ["smollm2-135m"]
    assert results == [str(presets.preset_dir("smollm2-135m"))] * 3

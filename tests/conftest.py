"""Shared fixtures: three tiny local members of different tokenizer families, and tiny harness tasks.

- ``bpe_member``: byte-level BPE tokenizer + random Llama (see tests/tiny_models.py)
- ``sp_member``:  SentencePiece-style byte-fallback tokenizer + random Gemma 3 text model
- ``unigram_member``: SentencePiece Unigram without byte fallback (``<unk>``) + random OLMo 2
- ``bpe_padded_member``: the bpe member whose logits are 40 rows wider than its tokenizer
- ``sp_sliding_member``: the sp member with an 8-token sliding-window layer (as Gemma 3's 512)
- ``sp_special_bytes_member``: the sp member whose tokenizer flags its <0xNN> byte tokens special
- ``tokenizers``, ``vocabs``: kind -> tokenizer / MemberVocab, for the tiny members ("bpe", "sp", "unigram")
  and the presets' own tokenizers ("smollm2-135m", "gemma3-270m"; no model is loaded)
- ``tiny_tasks_dir``: a directory of lm-eval task YAMLs over local JSONL (see tests/tiny_tasks.py)
- ``tiny_task_manager``: ``lm_eval.tasks.TaskManager(include_path=tiny_tasks_dir)``
- ``device``: runs a test on each device present: ``cpu``, and ``cuda`` (marked ``cuda``) where
  ``torch.cuda.is_available()``, skipped with the reason otherwise; ``make gpu-check`` runs ``-m cuda``

Everything is built once per session under pytest's tmp dirs, offline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Offline, always: no hub, no dataset downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import tiny_models  # noqa: E402
import tiny_tasks  # noqa: E402


NO_CUDA = f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])])
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_models")
    tiny_models.build_all(root)
    return root


@pytest.fixture(scope="session")
def bpe_member(tiny_models_dir) -> str:
    return str(tiny_models_dir / "bpe")


@pytest.fixture(scope="session")
def sp_member(tiny_models_dir) -> str:
    return str(tiny_models_dir / "sp")


@pytest.fixture(scope="session")
def unigram_member(tiny_models_dir) -> str:
    return str(tiny_models_dir / "unigram")


@pytest.fixture(scope="session")
def bpe_padded_member(tiny_models_dir) -> str:
    """The bpe member with 40 extra logit rows past its tokenizer (zero weights: logit 0)."""
    return tiny_models.build_member("bpe_padded", tiny_models_dir / "bpe_padded")


@pytest.fixture(scope="session")
def sp_sliding_member(tiny_models_dir) -> str:
    """The sp member whose first layer attends over a sliding window of 8 tokens."""
    return tiny_models.build_member("sp_sliding", tiny_models_dir / "sp_sliding")


@pytest.fixture(scope="session")
def sp_special_bytes_member(tiny_models_dir) -> str:
    """The sp member (same weights) whose <0xNN> byte tokens are special added tokens too."""
    return tiny_models.build_member("sp_special_bytes", tiny_models_dir / "sp_special_bytes")


class _Lazy(dict):
    """kind -> value, made on first use: the real tokenizers take seconds to load."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, kind):
        self[kind] = value = self.make(kind)
        return value


@pytest.fixture(scope="session")
def tokenizers(bpe_member, sp_member, unigram_member):
    """A test asking for a preset that `make models` has not converted is skipped."""
    from transformers import AutoTokenizer

    from lm_eval_rlae.offline.presets import preset_dir

    tiny = {"bpe": bpe_member, "sp": sp_member, "unigram": unigram_member}

    def load(kind):
        path = tiny.get(kind) or preset_dir(kind)
        if not (Path(path) / "tokenizer.json").is_file():
            pytest.skip(f"preset {kind!r} is not converted in {path}: run `make models` (only its tokenizer is read)")
        return AutoTokenizer.from_pretrained(path)

    return _Lazy(load)


@pytest.fixture(scope="session")
def vocabs(tokenizers):
    from lm_eval_rlae.engine.vocab import MemberVocab

    return _Lazy(lambda kind: MemberVocab.from_tokenizer(tokenizers[kind], vocab_size=None))


@pytest.fixture(scope="session")
def tiny_tasks_dir(tmp_path_factory) -> str:
    return tiny_tasks.write_tiny_tasks(tmp_path_factory.mktemp("tiny_tasks"))


@pytest.fixture(scope="session")
def tiny_task_manager(tiny_tasks_dir):
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing the harness's ~thousands of built-in tasks takes ~15 s.
    return TaskManager(include_path=tiny_tasks_dir, include_defaults=False)


@pytest.fixture(scope="session")
def run_eval(tiny_task_manager):
    """``run_eval(model, model_args, tasks, batch_size=1, **simple_evaluate_kwargs)``.

    Runs ``lm_eval.simple_evaluate`` with ``log_samples=True`` on the tiny tasks and returns
    ``{task: {doc["id"]: sample}}`` (plus ``"__results__"``: the harness's aggregate results).
    Memoised per session, so baselines shared between tests run once.
    """
    import json

    cache: dict[str, dict] = {}

    def run(model, model_args, tasks, batch_size=1, **kwargs):
        key = json.dumps([model, model_args, list(tasks), batch_size, kwargs], sort_keys=True, default=str)
        if key not in cache:
            import lm_eval

            out = lm_eval.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=list(tasks),
                task_manager=tiny_task_manager,
                log_samples=True,
                batch_size=batch_size,
                **kwargs,
            )
            by_task = {t: {s["doc"]["id"]: s for s in out["samples"][t]} for t in tasks}
            by_task["__results__"] = out["results"]
            cache[key] = by_task
        return cache[key]

    return run

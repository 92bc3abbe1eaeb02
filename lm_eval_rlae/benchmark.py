"""What the ensemble costs over its members: the same requests through each member alone (lm-eval's
`HFLM`, the very objects the ensemble holds, so on a CPU with its narrow linear layers too) and
through `rlae`, in one process, with ratios.

    python -m lm_eval_rlae.benchmark --members smollm2-135m,gemma3-270m [--batch-size 1,8]
        [--prompts 8] [--max-gen-toks 32] [--repeats 3] [--device cpu | --devices cuda:0,cuda:1]
        [--dtype auto | float32 | bfloat16] [--gate 0.9] [--agent rlae-ppo-specialists] [--weights 1,0]

The floor is the members' own forward passes: `rlae / members` is the ensemble's wall time over
the sum of the members' wall times (1.0 = the fusion costs nothing beyond running every member).
With each member on its own device (`--devices`), their forwards overlap and the floor is the
slowest member alone: `rlae / slowest member`.
Every run decodes exactly `--max-gen-toks` tokens (min_new_tokens), so a member that would stop
early does not make the ensemble look slow. Each time is the fastest of `--repeats` rounds, after a
warm-up round: on a shared machine, noise only ever adds time (as timeit's documentation argues),
and single rounds on 2 CPU cores drift by 10-15%. The runs alternate within a round, so a machine
that speeds up or slows down weighs on all of them alike.
Every weighting runs twice: step by step (`speculative=false`, e.g. `rlae uniform`) and drafted and
verified (`rlae speculative`, the default for greedy generation), whose line adds the share of
verified positions where the ensemble chose the drafted token (acceptance), the tokens a row keeps
per verify pass, and the numbers of verify passes and of plain steps (per batch size the engine
decodes in rounds or in plain steps, whichever it measured faster, in its last round). The two must
generate the same texts, or the benchmark stops. With `--gate`, the
ensemble also runs with that confidence gate (the other members skip the steps the first decides
alone); with `--agent`, with that agent setting the weights, its own time (state features, network)
counted in; with `--weights`, with those fixed weights; one-hot weights (e.g. `1,0`: one member
alone in the ensemble) are measured against that member alone (`rlae weights=[1,0] / NAME alone`).

Peak memory of a run is the weights of the models it uses plus the most memory the run held above
them (the process's peak resident memory on CPU, reset per run; allocated memory on CUDA, summed
over the devices used), so a member alone is charged its own weights and `members, sum` both
members' weights.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Varied lengths and scripts, so batches pad and members re-synchronise as in real tasks.
PROMPTS = [
    "Question: What is 12 plus 7?\nAnswer:",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Write a list of fruits:\n1.",
    "Translate to French: The cat sleeps on the warm windowsill.\nFrench:",
    "東京は日本の首都で、",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: Is the following sentence plausible? \"The goalkeeper scored a touchdown.\"\nA:",
]
CHOICES = [" yes", " no", " maybe not", " Paris"]
MiB = 2**20


def _requests(n_prompts: int, max_gen_toks: int) -> dict:
    """{"generate": [...], "score": [...]}: the harness requests of each kind."""
    from lm_eval.api.instance import Instance

    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(n_prompts)]
    gen_kwargs = {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks, "min_new_tokens": max_gen_toks, "do_sample": False}
    return {
        "generate": [Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(prompts)],
        "score": [Instance("loglikelihood", {}, (p, c), i) for i, p in enumerate(prompts) for c in CHOICES],
    }


class PeakMemory:
    """Bytes a block held at most above what was held when it began, over the given devices:
    allocated memory on each CUDA device, and for the CPU the process's peak resident set on Linux
    (its high-water mark reset through /proc/self/clear_refs); None where that cannot be read."""

    def __init__(self, devices: list[torch.device]):
        self.cuda = [device for device in devices if device.type == "cuda"]
        self.host = len(self.cuda) < len(devices)
        self.extra: int | None = None

    def __enter__(self):
        self._cuda_start = []
        for device in self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self._cuda_start.append(torch.cuda.memory_allocated(device))
        self._host_start = _reset_resident_peak() if self.host else 0
        return self

    def __exit__(self, *_):
        if self._host_start is None:
            return
        self.extra = _status_bytes("VmHWM") - self._host_start if self.host else 0
        for device, start in zip(self.cuda, self._cuda_start):
            torch.cuda.synchronize(device)
            self.extra += torch.cuda.max_memory_allocated(device) - start


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), flags=re.M).group(1)) * 1024


def _reset_resident_peak() -> int | None:
    """Resident bytes now, with the peak reset to them; None off Linux."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so an earlier run's is not counted as ours
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass
class Run:
    """One way of answering the requests, and what it measured."""

    label: str
    generate: Callable
    score: Callable
    weights: int  # bytes of the models it uses
    setup: Callable = lambda: None  # puts the shared ensemble in this run's configuration
    times: dict = field(default_factory=lambda: {"generate": [], "score": []})
    extra: dict = field(default_factory=lambda: {"generate": [], "score": []})
    texts: list | None = None  # what it generated
    drafting: Callable | None = None  # a speculative run: reads its engine's `speculative.Counts` (acceptance, tokens per pass)
    twin: Run | None = None  # a speculative run: the step-by-step run that must generate the same texts
    counts: object = None  # what `drafting` read after its last generation
    alone: int | None = None  # an ensemble run whose weights give one member all of it: that member's index (its floor)

    def measure(self, requests: dict, devices: list[torch.device]) -> None:
        self.setup()
        for kind, fn in (("generate", self.generate), ("score", self.score)):
            with PeakMemory(devices) as memory:
                start = time.perf_counter()
                out = fn(requests[kind], disable_tqdm=True)  # returns host values: every device is done
                self.times[kind].append(time.perf_counter() - start)
            self.extra[kind].append(memory.extra)
            if kind == "generate":
                self.texts = out
                self.counts = self.drafting() if self.drafting else None

    def seconds(self, kind: str) -> float:
        return min(self.times[kind])

    def peak(self, kind: str) -> int | None:
        return None if None in self.extra[kind] else self.weights + max(self.extra[kind])


def benchmark(ensemble, runs: list[Run], batch_size: int, requests: dict, warmup: dict, repeats: int) -> None:
    """Measure every run at this batch size: one warm-up round, then `repeats` alternating rounds."""
    ensemble.batch_size = batch_size
    for member in ensemble.members:
        member.lm.batch_size_per_gpu = batch_size
    devices = list(dict.fromkeys(torch.device(member.device) for member in ensemble.members))
    for run in runs:
        run.setup()
        run.generate(warmup["generate"], disable_tqdm=True)
        run.score(warmup["score"], disable_tqdm=True)
    for _ in range(repeats):
        for run in runs:
            run.measure(requests, devices)
    for run in runs:
        if run.twin is not None and run.texts != run.twin.texts:
            differ = [i for i, (a, b) in enumerate(zip(run.texts, run.twin.texts)) if a != b]
            raise SystemExit(
                f"{run.label} generated other texts than {run.twin.label} for requests {differ} (first: "
                f"{run.texts[differ[0]]!r} vs {run.twin.texts[differ[0]]!r}): speculative decoding must not change the output"
            )


def ratios(runs: list[Run], n_members: int, own_devices: bool = False) -> dict[str, dict]:
    """Each ensemble's {"generate", "score"} time over its floor, named in "floor": the sum of the
    members' times ("members"), with each member on its own device (`own_devices`) the slowest one's
    ("slowest member"), and for a run with one member's weight only (`Run.alone`) that member's
    ("NAME alone"); {"generate_memory", "score_memory"} peak over the members' summed peaks (None where
    memory cannot be read); and for a speculative run its "rounds" (verify passes) and "steps" (plain
    steps taken instead because they measured faster), "acceptance" and "tokens_per_round" (None
    where it verified nothing)."""
    alone, ensembles = runs[:n_members], runs[n_members:]
    out = {}
    for run in ensembles:
        if run.alone is not None:
            floor_runs, floor, name = [alone[run.alone]], sum, alone[run.alone].label.removesuffix(" (hf)")
        else:
            floor_runs, floor, name = alone, max if own_devices else sum, "slowest member" if own_devices else "members"
        out[run.label] = {kind: run.seconds(kind) / floor(member.seconds(kind) for member in floor_runs) for kind in ("generate", "score")}
        out[run.label]["floor"] = name
        for kind in ("generate", "score"):
            peaks = [member.peak(kind) for member in [*alone, run]]
            out[run.label][f"{kind}_memory"] = None if None in peaks else peaks[-1] / sum(peaks[:-1])
        if run.counts is not None:
            verified = run.counts.rounds > 0
            out[run.label] |= {
                "rounds": run.counts.rounds, "steps": run.counts.steps,
                "acceptance": run.counts.acceptance if verified else None, "tokens_per_round": run.counts.tokens_per_round if verified else None,
            }
    return out


def _drafting(ratio: dict) -> str:
    if ratio["rounds"]:
        return f", acceptance {ratio['acceptance']:.2f}, tokens per verify pass {ratio['tokens_per_round']:.2f} ({ratio['rounds']} verify passes, {ratio['steps']} plain steps)"
    if ratio["steps"]:
        return f", no verify pass: plain steps measured faster at this batch size ({ratio['steps']} plain steps)"
    return ", no verify pass (one member with weight decodes alone)"


def report(runs: list[Run], n_members: int, batch_size: int, own_devices: bool = False) -> str:
    """The table of runs (members alone first) and each ensemble's ratios to the floor (`ratios`)."""
    alone = runs[:n_members]

    def mib(run_peak):
        return "n/a" if run_peak is None else f"{run_peak / MiB:.0f}"

    def row(label, gen_s, score_s, gen_peak, score_peak):
        return f"| {label} | {gen_s:.2f} | {score_s:.2f} | {mib(gen_peak)} / {mib(score_peak)} |"

    kinds = ("generate", "score")
    sums = {kind: sum(run.seconds(kind) for run in alone) for kind in kinds}
    peaks = {kind: None if any(run.peak(kind) is None for run in alone) else sum(run.peak(kind) for run in alone) for kind in kinds}
    lines = [f"batch size {batch_size}", "| run | generate_until s | loglikelihood s | peak memory MiB (generate / score) |", "| --- | --- | --- | --- |"]
    for run in runs:
        lines.append(row(run.label, *map(run.seconds, kinds), *map(run.peak, kinds)))
        if run is alone[-1]:
            lines.append(row("members, sum", *sums.values(), *peaks.values()))
    lines.append("")
    for label, ratio in ratios(runs, n_members, own_devices).items():
        line = f"{label} / {ratio['floor']}, batch {batch_size}: generate_until {ratio['generate']:.2f}, loglikelihood {ratio['score']:.2f}"
        if ratio["generate_memory"] is not None:
            line += f", peak memory {ratio['generate_memory']:.2f} / {ratio['score_memory']:.2f}"
        if "acceptance" in ratio:
            line += _drafting(ratio)
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    """Prints the table of every batch size; returns {batch size: {"table": its text, "ratios": `ratios`}}."""
    parser = argparse.ArgumentParser(prog="python -m lm_eval_rlae.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--batch-size", default="1,8", help="one batch size or several, comma-separated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per run; the fastest is reported")
    parser.add_argument("--device", default=None, help="every member's device")
    parser.add_argument("--devices", default=None, help="one device per member, comma-separated, e.g. cuda:0,cuda:1")
    parser.add_argument("--dtype", default="auto", help="every member's dtype, as --model hf's: auto, float32, bfloat16, float16")
    parser.add_argument("--gate", type=float, default=None, help="also run the ensemble with this confidence gate")
    parser.add_argument("--agent", default=None, help="also run the ensemble with this agent (shipped name or directory)")
    parser.add_argument("--weights", default=None, help="also run the ensemble with these fixed weights, comma-separated, e.g. 1,0")
    args = parser.parse_args(argv)
    batch_sizes = [int(size) for size in str(args.batch_size).split(",")]
    if args.repeats < 1 or min(batch_sizes) < 1:
        parser.error("--repeats and --batch-size must be at least 1")

    from lm_eval_rlae.engine.fusion import check_gate
    from lm_eval_rlae.engine.speculative import Counts
    from lm_eval_rlae.lm import RLAELM
    from lm_eval_rlae.policies import make_policy
    from lm_eval_rlae.policies.agent import AgentPolicy

    ensemble = RLAELM(members=f"[{args.members}]", device=args.device, devices=args.devices and f"[{args.devices}]", dtype=args.dtype)
    engine = ensemble.engine
    agent = None if args.agent is None else AgentPolicy.load(args.agent, [member.name for member in ensemble.members])  # refused before any run
    fixed = None if args.weights is None else make_policy(f"[{args.weights}]", len(ensemble.members))
    held = [] if fixed is None else fixed.fixed.nonzero()[:, 0].tolist()
    chosen = held[0] if len(held) == 1 else None  # one-hot weights: measured against that member alone
    uniform, gate = engine.policy, check_gate(args.gate)

    def configure(policy, gate=None, speculative=False, span_length=engine.span_length):
        def setup():
            engine.use(policy)
            engine.gate, engine.speculative, engine.span_length = gate, speculative, span_length
            engine.drafting.counts = Counts()

        return setup

    def pair(label: str, policy, weights: int, gate=None, span_length=engine.span_length, alone=None) -> list[Run]:
        """The run step by step, then drafted and verified (`rlae speculative ...`), which must generate the same texts."""
        plain = Run(f"rlae {label}", ensemble.generate_until, ensemble.loglikelihood, weights, configure(policy, gate, False, span_length), alone=alone)
        drafted = Run(
            "rlae speculative" + (label.removeprefix("uniform") if label.startswith("uniform") else f" {label}"), ensemble.generate_until, ensemble.loglikelihood, weights,
            configure(policy, gate, True, span_length), drafting=lambda: engine.drafting.counts, twin=plain, alone=alone,
        )
        return [plain, drafted]

    every_weight = sum(weight_bytes(member.model) for member in ensemble.members)
    requests = _requests(args.prompts, args.max_gen_toks)
    warmup = _requests(args.prompts, min(4, args.max_gen_toks))  # every prompt: tables built on first use
    devices = [str(member.device) for member in ensemble.members]
    own_devices = len(set(devices)) == len(devices) > 1  # the members' forwards overlap
    dtypes = [str(member.model.dtype).removeprefix("torch.") for member in ensemble.members]
    print(f"{args.prompts} prompts x {args.max_gen_toks} new tokens (greedy, all of them decoded) and {len(requests['score'])} loglikelihood "
          f"requests, devices {', '.join(devices)}, dtypes {', '.join(dtypes)}, fastest of {args.repeats} rounds after a warm-up")
    results = {}
    for batch_size in batch_sizes:
        runs = [Run(f"{m.name} alone (hf)", m.lm.generate_until, m.lm.loglikelihood, weight_bytes(m.model)) for m in ensemble.members]
        runs += pair("uniform", uniform, every_weight)
        if gate is not None:
            runs += pair(f"uniform, gate={args.gate:g}", uniform, every_weight, gate)
        if agent is not None:
            runs += pair(f"agent={args.agent}", agent, every_weight + weight_bytes(agent.actor), span_length=agent.spec.span_length)
        if fixed is not None:
            runs += pair(f"weights=[{args.weights}]", fixed, every_weight, alone=chosen)
        benchmark(ensemble, runs, batch_size, requests, warmup, args.repeats)
        table = report(runs, len(ensemble.members), batch_size, own_devices)
        print("\n" + table, flush=True)
        results[batch_size] = {"table": table, "ratios": ratios(runs, len(ensemble.members), own_devices)}
    return results


if __name__ == "__main__":
    main()

"""What the ensemble costs over its members: the same requests through each member alone (lm-eval's
`HFLM`, the very objects the ensemble holds) and through `rlae`, in one process, with ratios.

    python -m lm_eval_rlae.benchmark --members smollm2-135m,gemma3-270m [--batch-size 8]
        [--prompts 16] [--max-gen-toks 32] [--device cpu] [--gate 0.9] [--agent rlae-ppo-specialists]

The floor is the members' own forward passes: `rlae / members` is the ensemble's wall time over
the sum of the members' wall times (1.0 = the fusion costs nothing beyond running every member).
With `--gate`, the ensemble also runs with that confidence gate (generation only: the other members
skip the steps the first decides alone); with `--agent`, with that agent setting the weights, its own
time (state features, network) counted in.
Peak GPU memory is reported per run on CUDA.
"""

from __future__ import annotations

import argparse
import time

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


def _requests(n_prompts: int, max_gen_toks: int):
    from lm_eval.api.instance import Instance

    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(n_prompts)]
    gen_kwargs = {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    generate = [Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(prompts)]
    score = [Instance("loglikelihood", {}, (p, c), i) for i, p in enumerate(prompts) for c in CHOICES]
    return generate, score


def _timed(fn, requests, device) -> tuple[float, float | None]:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn(requests, disable_tqdm=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_rlae.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--gate", type=float, default=None, help="also run the ensemble with this confidence gate")
    parser.add_argument("--agent", default=None, help="also run the ensemble with this agent (shipped name or directory)")
    args = parser.parse_args(argv)

    from lm_eval_rlae.engine.fusion import check_gate
    from lm_eval_rlae.lm import RLAELM
    from lm_eval_rlae.policies.agent import AgentPolicy

    ensemble = RLAELM(members=f"[{args.members}]", device=args.device, batch_size=args.batch_size)
    agent = None if args.agent is None else AgentPolicy.load(args.agent, [member.name for member in ensemble.members])  # refused before any run
    generate, score = _requests(args.prompts, args.max_gen_toks)
    device = ensemble.engine.device
    runs = {}
    for member in ensemble.members:
        member.lm.batch_size_per_gpu = args.batch_size
        runs[f"{member.name} alone (hf)"] = (_timed(member.lm.generate_until, generate, device), _timed(member.lm.loglikelihood, score, device))
    alone = list(runs.values())
    runs["members, sum"] = tuple((sum(run[k][0] for run in alone), None) for k in (0, 1))
    runs["rlae uniform"] = (_timed(ensemble.generate_until, generate, device), _timed(ensemble.loglikelihood, score, device))
    if args.gate is not None:
        ensemble.engine.gate = check_gate(args.gate)
        runs[f"rlae uniform, gate={args.gate:g}"] = (_timed(ensemble.generate_until, generate, device), _timed(ensemble.loglikelihood, score, device))
        ensemble.engine.gate = None
    if args.agent is not None:
        ensemble.engine.use(agent)
        runs[f"rlae agent={args.agent}"] = (_timed(ensemble.generate_until, generate, device), _timed(ensemble.loglikelihood, score, device))

    print(f"\n{args.prompts} prompts x {args.max_gen_toks} new tokens (greedy) and {len(score)} loglikelihood requests, "
          f"batch {args.batch_size}, device {device}")
    print(f"| run | generate_until s | loglikelihood s | peak GPU GiB (gen / score) |\n| --- | --- | --- | --- |")
    for label, ((gen_s, gen_mem), (score_s, score_mem)) in runs.items():
        memory = "n/a" if gen_mem is None else f"{gen_mem:.2f} / {score_mem:.2f}"
        print(f"| {label} | {gen_s:.2f} | {score_s:.2f} | {memory} |")
    (gen_sum, _), (score_sum, _) = runs["members, sum"]
    print()
    for label in [label for label in runs if label.startswith("rlae")]:
        (gen_rlae, _), (score_rlae, _) = runs[label]
        print(f"{label} / members: generate_until {gen_rlae / gen_sum:.2f}, loglikelihood {score_rlae / score_sum:.2f}")


if __name__ == "__main__":
    main()

"""Specialist members: LoRA adapters (peft) on the two real base models, each trained only on the
TRAIN split of its own skill set, so the ensemble has members whose strengths differ.

    rlae-build-specialists                      # both, from scratch or from their last checkpoint
    rlae-build-specialists smollm2-135m-math    # one
    rlae-build-specialists --out DIR --steps 20 # elsewhere, shorter (the committed ones: the defaults)

Training is supervised fine-tuning on the harness's own prompts: each train document of a skill-set
task is rendered by the task itself (`doc_to_text`, its target delimiter, the gold choice or the
target), tokenized by lm-eval's `HFLM` exactly as `--model hf` tokenizes that request at evaluation,
and the loss is the cross-entropy of the answer tokens only. Generation tasks are trained zero-shot
(their evaluation is 3-shot, which needs no training: the answer format is the same).

Deterministic: the whole batch schedule is a function of the seed, LoRA has no dropout, so a run
resumed from its checkpoint (every `checkpoint_every` steps: adapter, AdamW moments and step in
safetensors, the rest in JSON, written atomically) continues bit for bit where it stopped.
Checkpoints and TensorBoard logs go to `$RLAE_CACHE/specialists/<name>/` (`--work`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lm_eval_rlae.files import previous_version, reading_directory, replacing_directory
from lm_eval_rlae.offline.data import TASK_CONFIGS
from lm_eval_rlae.offline.presets import ADAPTERS_DIR, SPECIALIST_PRESETS, cache_dir, resolve_preset

logger = logging.getLogger(__name__)

_ARITHMETIC = [f"bb_arithmetic_{n}_digit_{op}" for n in (2, 3) for op in ("addition", "subtraction", "multiplication")]


@dataclasses.dataclass(frozen=True)
class SpecialistConfig:
    """Everything that determines an adapter. Stored next to it as `training_config.json`."""

    name: str  # the preset it becomes
    base: str  # base-model preset
    tasks: tuple[str, ...]  # the skill set: harness task names
    max_docs_per_task: int = 400  # of each task's train split (a fixed hash-ordered sample)
    steps: int = 300
    batch_tokens: int = 1024  # rows x padded length per step
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seed: int = 1234
    checkpoint_every: int = 25


SPECIALISTS: dict[str, SpecialistConfig] = {
    c.name: c
    for c in (
        SpecialistConfig(
            name="smollm2-135m-math",
            base="smollm2-135m",
            tasks=("bb_arithmetic_mc", *_ARITHMETIC, "bb_object_counting"),
            max_docs_per_task=600,
            steps=200,
        ),
        SpecialistConfig(
            name="gemma3-270m-lang",
            base="gemma3-270m",
            # chosen on the validation split (README, "Specialist members"): of 13 BIG-bench language
            # tasks, those where Gemma with a first adapter led the arithmetic specialist by >= 10 points
            tasks=(
                "bb_causal_judgment",
                "bb_date_understanding",
                "bb_disambiguation_qa",
                "bb_navigate",
                "bb_reasoning_about_colored_objects",
                "bb_ruin_names",
                "bb_sports_understanding",
                "bb_winowhy",
            ),
            max_docs_per_task=250,
            steps=200,
        ),
    )
}
assert {c.name: c.base for c in SPECIALISTS.values()} == SPECIALIST_PRESETS, "presets.SPECIALIST_PRESETS mirrors this table"


# --- data ------------------------------------------------------------------------------------------


def task_examples(task_names, max_docs_per_task: int, include_path: Path = TASK_CONFIGS) -> list[tuple[str, str, str]]:
    """(task, context, continuation) of the train documents, rendered by each harness task."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    tasks = manager.load(list(task_names))["tasks"]
    examples = []
    for name in task_names:
        task = tasks[name]
        if not task.has_training_docs():
            raise ValueError(f"task {name!r} has no train split; a specialist trains on train splits only")
        docs = list(task.training_docs())[:max_docs_per_task]
        delimiter = task.config.target_delimiter
        for doc in docs:
            context = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            target = target[0] if isinstance(target, list) else target  # several accepted answers: the first
            if task.OUTPUT_TYPE == "multiple_choice":
                answer = task.doc_to_choice(doc)[target]
            elif task.OUTPUT_TYPE == "generate_until":
                # teach the stop too: generation ends at the first stop sequence
                answer = str(target) + task.config.generation_kwargs["until"][0]
            else:
                raise ValueError(f"task {name!r} is {task.OUTPUT_TYPE}; specialists train on multiple_choice and generate_until tasks")
            examples.append((name, context, delimiter + answer))
    return examples


def encode(lm, examples) -> list[tuple[list[int], int]]:
    """(ids, n_answer) per example; HFLM's own split of context and continuation."""
    encoded = []
    for _task, context, continuation in examples:
        context_ids, answer_ids = lm._encode_pair(context, continuation)
        encoded.append((context_ids + answer_ids, len(answer_ids)))
    return encoded


def batch_schedule(lengths: list[int], steps: int, batch_tokens: int, seed: int) -> list[list[int]]:
    """`steps` batches of example indices: epochs of seeded permutations, each cut into chunks that
    are sorted by length and packed into batches of at most `batch_tokens` padded tokens."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        epoch = []
        for start in range(0, len(order), 256):
            chunk = sorted(order[start : start + 256], key=lambda i: lengths[i])
            batch: list[int] = []
            for i in chunk:
                if batch and (len(batch) + 1) * lengths[i] > batch_tokens:
                    epoch.append(batch)
                    batch = []
                batch.append(i)
            epoch.append(batch)
        shuffle = torch.randperm(len(epoch), generator=generator).tolist()
        batches.extend(epoch[j] for j in shuffle)
    return batches[:steps]


def collate(encoded, indices, pad_id: int):
    """Left-padded batch; answers end every row, so the last K logits hold every answer token.

    Returns input_ids, attention_mask, position_ids [B, T], labels [B, K-1] (-100 off the answer)."""
    rows = [encoded[i] for i in indices]
    T = max(len(ids) for ids, _ in rows)
    K = max(n for _, n in rows) + 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), K - 1), -100, dtype=torch.long)
    for b, (ids, n_answer) in enumerate(rows):
        input_ids[b, T - len(ids) :] = torch.tensor(ids)
        attention_mask[b, T - len(ids) :] = 1
        labels[b, K - 1 - n_answer :] = torch.tensor(ids[len(ids) - n_answer :])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, labels


# --- checkpoints -----------------------------------------------------------------------------------


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, step: int, config: SpecialistConfig, log: list) -> None:
    """adapter + AdamW state as safetensors, the rest as JSON; written beside, then swapped in."""
    params = _trainable(model)
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}/{n}"] = state[key]
        if "step" in state:
            tensors[f"step/{n}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    with replacing_directory(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": _jsonable(config), "log": log}, indent=1))


def load_checkpoint(path: Path, model, optimizer, config: SpecialistConfig) -> tuple[int, list]:
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        missing = [n for n in _trainable(model) if f"param/{n}" not in tensors]
        if missing or not {"step", "config", "log"} <= meta.keys():
            raise ValueError(f"it lacks {missing[:2] or 'step, config or log'}")
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(f"the checkpoint in {path} is damaged ({error}); pass --restart to train from scratch") from error
    if meta["config"] != _jsonable(config):
        raise ValueError(
            f"the checkpoint in {path} was trained with another configuration; delete that directory "
            f"(or pass --restart) to train from scratch, or pass --work elsewhere"
        )
    for n, p in _trainable(model).items():
        with torch.no_grad():
            p.copy_(tensors[f"param/{n}"])
        if f"exp_avg/{n}" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"step/{n}"].reshape(()),
                "exp_avg": tensors[f"exp_avg/{n}"],
                "exp_avg_sq": tensors[f"exp_avg_sq/{n}"],
            }
    return meta["step"], meta["log"]


def _jsonable(config: SpecialistConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


# --- training --------------------------------------------------------------------------------------


def learning_rate(config: SpecialistConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build(
    config: SpecialistConfig,
    out_root: Path = ADAPTERS_DIR,
    work_root: Path | None = None,
    restart: bool = False,
    include_path: Path = TASK_CONFIGS,
) -> Path:
    """Trains (or resumes) one specialist; writes the peft adapter to `out_root/<name>`, and its
    checkpoint and TensorBoard logs to `work_root/<name>` (default: the cache, `specialists/`)."""
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(config.seed)
    out = out_root / config.name
    work = (work_root or cache_dir() / "specialists") / config.name
    checkpoint = work / "checkpoint"
    if restart:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(previous_version(checkpoint), ignore_errors=True)
    base = resolve_preset(config.base) or config.base
    lm = HFLM(pretrained=base, device="cpu", dtype="float32", batch_size=1)
    examples = task_examples(config.tasks, config.max_docs_per_task, include_path)
    encoded = encode(lm, examples)
    schedule = batch_schedule([len(ids) for ids, _ in encoded], config.steps, config.batch_tokens, config.seed)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eot_token_id

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # no dropout: a resumed run is the same run
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(lm.model, lora)
    model.train()
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, log = 0, []
    with reading_directory(checkpoint) as saved:  # or the one a kill between two renames left
        if saved.exists():
            step, log = load_checkpoint(saved, model, optimizer, config)
            logger.info("%s: resuming from step %d of %d (%s)", config.name, step, config.steps, saved)

    writer = SummaryWriter(str(work / "runs"), purge_step=step)
    n_tokens = sum(len(ids) for ids, _ in encoded)
    print(
        f"{config.name}: {len(encoded)} train documents from {len(config.tasks)} tasks ({n_tokens} tokens), "
        f"{config.steps} steps of <= {config.batch_tokens} tokens on {config.base}",
        file=sys.stderr,
        flush=True,
    )
    bar = tqdm(total=config.steps, initial=step, desc=config.name, unit="step", dynamic_ncols=True)
    while step < config.steps:
        start = time.perf_counter()
        input_ids, attention_mask, position_ids, labels = collate(encoded, schedule[step], pad_id)
        K = labels.shape[1] + 1
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=K
        ).logits  # [B, K, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - start
        log.append({"step": step, "loss": round(loss.item(), 5)})
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("train/grad_norm", grad_norm.item(), step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/tokens_per_s", input_ids.numel() / seconds, step)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(checkpoint, model, optimizer, step, config, log)
    bar.close()
    writer.close()

    _export(model, config, out, log)
    return out


def _export(model, config: SpecialistConfig, out: Path, log: list) -> None:
    """The peft adapter (float16 safetensors: half the size, loaded into any dtype) and its config,
    swapped in whole: an evaluation loading the preset meanwhile reads the old adapter or the new."""
    for p in _trainable(model).values():
        p.data = p.data.to(torch.float16)
    losses = [entry["loss"] for entry in log]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    with replacing_directory(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        (tmp / "adapter_model.safetensors").chmod(0o644)
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = config.base  # a preset name, not this machine's cache path
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # a set in peft: stable order
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        (tmp / "training_config.json").write_text(
            json.dumps(
                {
                    "config": _jsonable(config),
                    "command": f"rlae-build-specialists {config.name}",
                    "loss_first_tenth": round(sum(head) / len(head), 4),
                    "loss_last_tenth": round(sum(tail) / len(tail), 4),
                },
                indent=2,
            )
            + "\n"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlae-build-specialists",
        description="Train the specialist LoRA adapters (resuming from their checkpoints) and write them where their presets load them.",
    )
    parser.add_argument("names", nargs="*", help=f"specialists to build (default: all): {', '.join(SPECIALISTS)}")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR, help=f"where adapters go (default: {ADAPTERS_DIR})")
    parser.add_argument("--work", type=Path, help="checkpoints and TensorBoard logs (default: $RLAE_CACHE/specialists)")
    parser.add_argument("--steps", type=int, help="override the number of steps (a quick check; not the committed adapters)")
    parser.add_argument("--restart", action="store_true", help="ignore existing checkpoints and train from scratch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [n for n in args.names if n not in SPECIALISTS]
    if unknown:
        parser.error(f"unknown specialist(s) {', '.join(unknown)}; known: {', '.join(SPECIALISTS)}")
    for name in args.names or list(SPECIALISTS):
        config = SPECIALISTS[name]
        if args.steps is not None:
            config = dataclasses.replace(config, steps=args.steps)
        out = build(config, args.out, args.work, restart=args.restart)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

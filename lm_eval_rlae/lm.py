"""`lm_eval --model rlae`: the harness LM class of the ensemble.

    lm_eval --model rlae \\
      --model_args 'members=[HuggingFaceTB/SmolLM2-135M-Instruct,google/gemma-3-270m],weights=uniform' \\
      --tasks gsm8k,mmlu

Requests are ordered and batched with lm-eval's own Collator (longest first, generation grouped
by gen_kwargs) and run through the FusionEngine.

Data parallel, as `--model hf` on several GPUs: `accelerate launch -m lm_eval --model rlae ...` runs
one process per device, each with every member on its own device; the harness gives each process
its share of the documents (`rank`, `world_size`) and gathers their results. CPU processes work too
(gloo), unlike hf, which splits documents only over several GPUs.

With `--log_samples`, the weights an agent or `weights=perplexity` chose for every request are written
beside the samples (`decisions.py`). With `calibrate=K` (by default with an agent), each task first tries
its weights and each member alone on K labelled documents the evaluation does not read, and runs with a
member alone where that member beats the weights there with evidence (`calibration.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from lm_eval.api.model import LM
from lm_eval.models.utils import Collator, postprocess_generated_text
from tqdm import tqdm

from lm_eval_rlae.calibration import DEFAULT_DOCUMENTS, Calibrator
from lm_eval_rlae.decisions import Recorder
from lm_eval_rlae.engine.chat import encode_chat
from lm_eval_rlae.engine.fusion import Decoding, FusionEngine, check_gate
from lm_eval_rlae.engine.members import Member, MemberSpec
from lm_eval_rlae.model_args import parse_list
from lm_eval_rlae.policies import make_policy
from lm_eval_rlae.policies.agent import AgentPolicy

logger = logging.getLogger(__name__)


class RLAELM(LM):
    """A token-level ensemble of causal LMs with possibly different tokenizers.

    members:      model names, paths or presets: `[a,b]`, or a JSON list whose items may be dicts
                  of per-member options (`{"pretrained": ..., "device": "cuda:1", "dtype": "bfloat16",
                  "gguf_file": ..., "peft": ...}`)
    weights:      `uniform`, one non-negative weight per member (e.g. `[0.7,0.3]`), or `perplexity`:
                  PackLLM's weights from each member's perplexity of the prompt
    perplexity_temperature: of the softmax over negative log-perplexities (default 1, PackLLM's)
    gate:         a confidence gate for generation (GaC's), e.g. 0.9: a token the first member gives
                  more than this probability is its alone, and the other members skip that step
    speculative:  greedy generation drafts with one member and verifies with the others in one
                  forward, with exactly the output of step-by-step decoding, wherever rounds
                  measure faster than plain steps; `auto` (default) and `true`: so; `false`:
                  step by step. Sampling always goes step by step.
    agent:        a trained RLAE agent instead of fixed weights: a directory written by `rlae-train`
                  or the name of a shipped agent (`lm_eval_rlae/agents/`)
    span_length:  union tokens generated between two calls of the weight policy (default: the
                  agent's own, else 4)
    calibrate:    K: per task, try the weights (or agent) and each member alone on K labelled
                  documents of the task that are not evaluated, and run the task with a member
                  alone where it beats the weights there with evidence (a sign test, p < 0.1);
                  0: off; `auto` (default): 16 with an agent (so that on a task it never saw it
                  does no worse than the better member), off with fixed weights.
                  `calibrate_include=DIR`: where to find tasks when the model is used outside the harness
    device/dtype: defaults for every member; `devices=[..]` / `dtypes=[..]` set them per member
                  (under `accelerate launch` on several processes, each process's own device)
    trust_remote_code: off unless asked, for every member
    """

    def __init__(
        self,
        members=None,
        weights=None,
        perplexity_temperature: float = 1.0,
        agent: str | None = None,
        span_length: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        devices=None,
        dtypes=None,
        trust_remote_code: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int = 64,
        max_gen_toks: int = 256,
        seed: int = 1234,
        gate: float | None = None,
        speculative: bool | str = "auto",
        calibrate: int | str = "auto",
        calibrate_include: str | None = None,
    ):
        super().__init__()
        entries = parse_list(members)
        if not entries:
            raise ValueError("rlae needs members: --model_args 'members=[model_a,model_b]' (hub ids, local paths or presets)")
        if span_length is not None and int(span_length) < 1:
            raise ValueError(f"span_length={span_length}: it must be an integer >= 1 (tokens generated per weight decision)")
        per_member = {"device": parse_list(devices), "dtype": parse_list(dtypes)}
        for key, values in per_member.items():
            if values and len(values) != len(entries):
                raise ValueError(f"{key}s has {len(values)} values for {len(entries)} members: give one per member")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.accelerator = _data_parallel()
        if self.accelerator is not None:
            if per_member["device"]:
                raise ValueError(
                    f"devices={devices} under accelerate launch with {self.accelerator.num_processes} processes: each "
                    "process holds every member on its own device; drop devices=, or run one process"
                )
            device = str(self.accelerator.device)
        self._rank = self.accelerator.process_index if self.accelerator else 0
        self._world_size = self.accelerator.num_processes if self.accelerator else 1
        specs = [
            MemberSpec.parse(
                entry,
                {
                    "device": per_member["device"][i] if per_member["device"] else device,
                    "dtype": per_member["dtype"][i] if per_member["dtype"] else dtype,
                    "trust_remote_code": trust_remote_code,
                },
            )
            for i, entry in enumerate(entries)
        ]
        # arguments and the agent's checkpoint are checked before loading any model
        gate = check_gate(gate)
        calibrate = _calibration_documents(calibrate, agent is not None)
        speculative = None if str(speculative).strip().lower() == "auto" else _flag(speculative, "speculative")
        if agent is not None:
            if weights is not None:
                raise ValueError(f"give weights={weights} or agent={agent}, not both: an agent sets the weights itself")
            policy = AgentPolicy.load(str(agent), [spec.pretrained for spec in specs])
            span_length = span_length or policy.spec.span_length
        else:
            policy = make_policy(weights, len(entries), float(perplexity_temperature))
        self.members = [Member(spec) for spec in specs]
        self.engine = FusionEngine(self.members, policy, span_length=int(span_length or 4), seed=int(seed), gate=gate, speculative=speculative)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.members[0].device
        self.decisions = Recorder(self.engine, [member.name for member in self.members])
        self.calibrator = (
            Calibrator(self.engine, calibrate, calibrate_include, self.batch_size, self.max_gen_toks) if calibrate else None
        )

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        # lm-eval's simple parser splits on every comma, breaking `members=[a,b]`; split at top level.
        from lm_eval._cli.utils import key_val_to_dict

        additional = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**key_val_to_dict(arg_string), **additional)

    # the harness's collectives, as HFLM's (no-ops in one process)
    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        """The harness gathers every process's logged samples to rank 0 here; each process's weight
        decisions travel with them, so rank 0 writes them all beside the samples."""
        if self.accelerator is None:
            return [obj]
        import torch.distributed

        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=(obj, self.decisions.log.records), object_gather_list=gathered, dst=dst)
        if gathered is None:
            return None
        for _, records in gathered:
            self.decisions.log.merge(records)
        return [obj for obj, _ in gathered]

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return "+".join(member.name for member in self.members)

    def chat_template(self, chat_template=False) -> str | None:
        templates = [member.lm.chat_template(chat_template) for member in self.members]
        return None if all(t is None for t in templates) else "\n".join(t or "" for t in templates)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return encode_chat(chat_history, add_generation_prompt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        _check_text_only(requests)
        self.decisions.start(requests)
        return self._per_task(requests, self._generate_until, disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        _check_text_only(requests)
        self.decisions.start(requests)
        return self._per_task(requests, self._loglikelihood, disable_tqdm)

    def _per_task(self, requests, run, disable_tqdm: bool) -> list:
        """`run` over the requests; with `calibrate`, task by task, each under the policy chosen for it."""
        if self.calibrator is None:
            return run(requests, disable_tqdm)
        by_task: dict[str | None, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_task[request.task_name].append(i)
        results: list = [None] * len(requests)
        try:
            for task, indices in by_task.items():
                group = [requests[i] for i in indices]
                self.engine.use(self.calibrator.policy_for(task, group))
                for i, answer in zip(indices, run(group, disable_tqdm)):
                    results[i] = answer
        finally:
            self.engine.use(self.calibrator.policy)
        return results

    def _generate_until(self, requests, disable_tqdm: bool) -> list[str]:
        collator = Collator(
            requests,
            sort_fn=lambda request: (-len(request.args[0]), request.args[0]),
            group_by="gen_kwargs",
            group_fn=lambda request: request.args[1],
        )
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="rlae generate_until") as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*(request.args for request in chunk))
                decoding = Decoding.from_gen_kwargs(all_kwargs[0], self.max_gen_toks)
                with self.decisions.watch(chunk):
                    texts = self.engine.generate(list(contexts), decoding)
                for context, text in zip(contexts, texts):
                    text = postprocess_generated_text(text, decoding.until, None)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                    bar.update(1)
        return collator.get_original(results)

    def _loglikelihood(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Batches are `batch_size` distinct contexts, longest first, each with all its
        continuations, so each member reads a shared context (a question's choices) once."""
        by_context: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_context[request.args[0]].append(i)
        contexts = sorted(by_context, key=lambda context: (-len(context), context))
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="rlae loglikelihood") as bar:
            for start in range(0, len(contexts), self.batch_size):
                indices = [i for context in contexts[start : start + self.batch_size] for i in by_context[context]]
                with self.decisions.watch([requests[i] for i in indices]):
                    answers = self.engine.loglikelihood([requests[i].args for i in indices])
                for i, answer in zip(indices, answers):
                    results[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, answer)
                    bar.update(1)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.decisions.start(requests)
        collator = Collator(requests, sort_fn=lambda request: (-len(request.args[0]), request.args[0]))
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="rlae loglikelihood_rolling") as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                texts = [request.args[0] for request in chunk]
                with self.decisions.watch(chunk):
                    answers = self.engine.loglikelihood_rolling(texts)
                for text, answer in zip(texts, answers):
                    results.append(answer)
                    self.cache_hook.add_partial("loglikelihood_rolling", (text,), answer)
                    bar.update(1)
        return collator.get_original(results)


def _data_parallel():
    """accelerate's Accelerator when launched on several processes, else None. Without a GPU,
    accelerate makes processes a group only when told they are CPU ones (gloo)."""
    import os

    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # a process that finishes its share early waits for the others (HFLM's timeout)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])


def _check_text_only(requests) -> None:
    for request in requests:
        if len(request.args) != 2:
            raise ValueError(
                f"rlae cannot serve this {request.request_type} request of task {request.task_name!r}: it carries "
                f"{len(request.args) - 2} extra (e.g. image) inputs, and rlae ensembles text-only causal LMs"
            )


def _flag(value, name: str) -> bool:
    """A true/false model argument, as the command line (a bool) or a dict (maybe a string) gives it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"{name}={value!r}: give true or false{' (or auto)' if name == 'speculative' else ''}")
    return text in ("true", "1")


def _calibration_documents(value, with_agent: bool) -> int:
    """`calibrate`: a number of documents, 0 (off) or `auto` (DEFAULT_DOCUMENTS with an agent, else off)."""
    if str(value).strip().lower() == "auto":
        return DEFAULT_DOCUMENTS if with_agent else 0
    try:
        documents = int(value or 0)
    except ValueError:
        documents = -1
    if documents < 0:
        raise ValueError(f"calibrate={value}: give the number of labelled documents each task is calibrated on (e.g. 16), 0 (off) or auto")
    return documents


def _batch_size(batch_size, max_batch_size: int) -> int:
    if str(batch_size).startswith("auto"):
        logger.warning("rlae does not probe for a batch size; batch_size=auto uses max_batch_size=%d", max_batch_size)
        return int(max_batch_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size}: it must be >= 1")
    return int(batch_size)

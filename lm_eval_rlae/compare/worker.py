"""One method of `rlae-compare`: the harness's own command line in this process, with what it costs
measured on the way.

    python -m lm_eval_rlae.compare.worker COST.json COUNT_WITH run --model ... --log_samples ...

The model's request methods (hf's and rlae's) are timed per request type; generated texts are
counted in tokens of one tokenizer (COUNT_WITH, the first member's, the same unit for every method).
Written to COST.json when the harness returns, with the peak GPU memory where there is a GPU (the
caller measures the process's peak resident memory). An agent's weight decisions need nothing here:
`--log_samples` writes them beside the samples (`lm_eval_rlae.decisions`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REQUEST_TYPES = ("generate_until", "loglikelihood", "loglikelihood_rolling")


def main() -> int:
    cost_path, count_with = Path(sys.argv.pop(1)), sys.argv.pop(1)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from lm_eval_rlae.lm import RLAELM

    counter = AutoTokenizer.from_pretrained(count_with)
    cost = {kind: {"seconds": 0.0, "requests": 0} for kind in REQUEST_TYPES} | {"generated_tokens": 0}

    def timed(cls, kind):
        original = getattr(cls, kind)

        def run(self, requests, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, requests, *args, **kwargs)
            cost[kind]["seconds"] += time.perf_counter() - start
            cost[kind]["requests"] += len(requests)
            if kind == "generate_until":
                cost["generated_tokens"] += sum(len(counter(text, add_special_tokens=False).input_ids) for text in out)
            return out

        setattr(cls, kind, run)

    for cls in (HFLM, RLAELM):
        for kind in REQUEST_TYPES:
            timed(cls, kind)
    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
        return 0
    finally:
        cost["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        cost_path.write_text(json.dumps(cost) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""lm-eval-rlae: RLAE, a token-level ensemble of heterogeneous LLMs weighted by an RL agent,
as an lm-evaluation-harness model (`lm_eval --model rlae`).

This package is imported at interpreter start-up by `lm_eval_rlae.pth` (see `_startup`), so it
must stay light: nothing here imports torch, transformers or lm-eval.
"""

__version__ = "0.1.0"

"""The training side of RLAE.

- `specialists`: the specialist LoRA adapters (`rlae-build-specialists`), members whose strengths
  differ, trained on the train splits of disjoint skill sets; `specialist_table` compares them on
  the test splits (`rlae-specialist-table`).
- The RL environment (one document per episode, one span per step), the PPO / MAPPO agents trained
  with Tianshou, task-metric rewards and `rlae-train` come with the learned-agents issue;
  `lm_eval_rlae.engine.fusion.Generation` is the decoding seam they drive.

It imports the runtime (`lm_eval_rlae`); the runtime never imports it.
"""

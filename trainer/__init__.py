"""The training side of RLAE: the environment (one document per episode, one span per step), the
PPO / MAPPO agents trained with Tianshou, task-metric rewards and `rlae-train`.

It imports the runtime (`lm_eval_rlae`); the runtime never imports it. Its modules come with the
learned-agents issue; `lm_eval_rlae.fusion.Generation` is the decoding seam it drives.
"""

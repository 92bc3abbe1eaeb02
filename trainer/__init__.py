"""The training side of RLAE, by concern.

- `specialists`: the specialist LoRA adapters (`rlae-build-specialists`, `build`), members whose
  strengths differ, trained on the train splits of disjoint skill sets; `table` compares them on the
  test splits (`rlae-specialist-table`).
- `agents`: the learned agents. Harness tasks as episodes with their own metrics as rewards (`tasks`),
  the multiple-choice score cache (`scores`), the batched env over
  `lm_eval_rlae.engine.fusion.Generation` (`env`), a config and what it builds (`run`), PPO / MAPPO on
  Tianshou (`algorithms`), `rlae-train` (`train`, its checkpoints in `checkpoint`), the env's rows on
  Ray workers (`rollouts`), the best fixed weights (`fixed_weights`) and the test-split table
  (`agent_table`).

It imports the runtime (`lm_eval_rlae`); the runtime never imports it.
"""

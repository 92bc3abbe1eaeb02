"""The learned agents' training: harness tasks as episodes, the env, PPO / MAPPO, `rlae-train` (see `trainer`)."""

"""The specialist LoRA adapters: `build` (`rlae-build-specialists`) and their table (`rlae-specialist-table`)."""

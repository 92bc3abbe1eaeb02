"""What `rlae-compare` compares: its typed config (`CompareConfig`, YAML and flags) and the methods it
runs, each a harness model with its model arguments. The command (`command`) runs them; the report
(`report`) reads their runs back under the same labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lm_eval_rlae import dataclass_config

CONFIGS = Path(__file__).parent / "configs"


@dataclasses.dataclass
class CompareConfig:
    """One comparison. YAML keys and command-line flags have these names."""

    members: list[str]  # as in --model_args members=[...]
    tasks: list[str]  # harness task names
    limit: int = 100  # documents per task: the first N of the split (as lm_eval --limit)
    split: str = "test"  # test | validation | train (offline tasks)
    include_path: str | None = None  # more task YAMLs (default: the offline task configs)
    best_fixed: str | list[float] | None = None  # rlae-best-fixed's best_fixed.json, or the weights themselves
    agents: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> shipped agent or directory
    perplexity_temperature: float = 1.0
    gate: float | None = None  # also uniform weights under this confidence gate (e.g. 0.9): what the speed-up costs
    calibrate: int = 0  # also uniform and each agent with calibrate=K (K labelled documents per task, not of the split compared); agents alone run with calibrate=0
    batch_size: int = 16
    device: str | None = None
    output: str | None = None  # default: results/compare/<config name>

    def best_fixed_weights(self) -> list[float] | None:
        if self.best_fixed is None or isinstance(self.best_fixed, list):
            return self.best_fixed
        path = Path(self.best_fixed)
        if not path.is_file():
            raise SystemExit(f"best_fixed: no {path}; run rlae-best-fixed (it searches the validation split) or give the weights, e.g. --best_fixed '[0.5, 0.5]'")
        return json.loads(path.read_text())["best"]["weights"]


def methods(config: CompareConfig) -> dict[str, tuple[str, str]]:
    """label -> (harness model, its model arguments)."""
    from lm_eval_rlae.offline.presets import hf_model_args

    members = f"members=[{','.join(config.members)}]"
    out = {f"{short} alone": ("hf", hf_model_args(name)) for short, name in zip(short_names(config.members), config.members)}
    out["uniform"] = ("rlae", f"{members},weights=uniform")
    if config.gate is not None:
        out[f"uniform, gate={config.gate:g}"] = ("rlae", f"{members},weights=uniform,gate={config.gate:g}")
    out["perplexity"] = ("rlae", f"{members},weights=perplexity,perplexity_temperature={config.perplexity_temperature:g}")
    if (fixed := config.best_fixed_weights()) is not None:
        out["best fixed"] = ("rlae", f"{members},weights=[{','.join(f'{w:g}' for w in fixed)}]")
    agents = {label: f"agent={agent}" for label, agent in config.agents.items()}
    for label, policy in agents.items():
        out[label] = ("rlae", f"{members},{policy},calibrate=0")  # the agent's own weights on every task
    for label, policy in ({"uniform": "weights=uniform"} | agents).items() if config.calibrate else ():
        out[f"{label}, calibrated"] = ("rlae", f"{members},{policy},calibrate={config.calibrate}")
    return out


def short_names(members: list[str]) -> list[str]:
    """Members as a person reads them: a path or hub id by its last part, where that stays unique."""
    short = [Path(name).name or name for name in members]
    return short if len(set(short)) == len(short) else list(members)


def load_config(path: Path | None, overrides: dict) -> CompareConfig:
    config = dataclass_config.load(CompareConfig, path, overrides, required=("members", "tasks"))
    if isinstance(config.tasks, str):  # --tasks a,b
        config.tasks = [t for t in config.tasks.split(",") if t]
    if config.output is None:
        config.output = str(Path("results") / "compare" / (Path(path).stem if path else "rlae"))
    return config

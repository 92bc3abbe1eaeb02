"""Learned weighting agents (RLAE_PPO, RLAE_MAPPO) at evaluation: their actor networks, their
checkpoints, and `AgentPolicy`, the `WeightPolicy` that runs one (`--model_args agent=PATH`).

An actor maps the state vector of each row ([B, D], see `state.py`) to positive concentrations
alpha [B, M], one per member. RLAE_PPO's actor is one network whose alpha parametrises a Dirichlet
over the weights; RLAE_MAPPO has one network per member, each seeing only its own member's segments
and the shared ones, whose alpha_m parametrises a Gamma(alpha_m, 1) draw g_m, with weights g / sum(g)
(so the joint action is again Dirichlet(alpha)). Either way the weights used at evaluation are the
mean of that Dirichlet, alpha / sum(alpha): deterministic, and smooth where the mode is not.

A checkpoint is a directory with `actor.safetensors` and `agent.json` (algorithm, members as given
in `members=`, a fingerprint of each member's vocabulary, state kind and layout, span length,
network sizes, how it was trained). Never pickle. The training side (`trainer/`) writes them; the
runtime only reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lm_eval_rlae.files import reading_directory, replacing_directory
from lm_eval_rlae.policies.base import PolicyState, WeightPolicy
from lm_eval_rlae.policies.state import STATE_VERSION, TEXT_ENCODER, StateLayout, make_state_features

AGENT_FORMAT = 1
ALGORITHMS = ("ppo", "mappo")
AGENTS_DIR = Path(__file__).resolve().parent.parent / "agents"  # the shipped agents, by name
ACTOR_FILE, SPEC_FILE = "actor.safetensors", "agent.json"


# ----------------------------------------------------------------------------- networks


@dataclass(frozen=True)
class NetworkConfig:
    embed: int = 64  # each raw vector (a member's hidden state, the text embedding) is projected to this
    hidden: tuple[int, ...] = (128, 128)  # MLP widths after the encoder
    alpha_min: float = 0.2  # concentrations stay in [alpha_min, alpha_max]: off 0, so log-probs stay finite
    alpha_max: float = 200.0


class StateEncoder(nn.Module):
    """[B, D] state -> [B, F] features of the given members' segments and the shared ones.

    Raw vectors (hidden.m, text) are layer-normalised and projected to `embed`; the O(1) stats and
    shared segments pass through as they are.
    """

    def __init__(self, layout: StateLayout, members: list[int], config: NetworkConfig):
        super().__init__()
        self.slices = layout.slices()
        self.members = members
        vectors = [f"hidden.{m}" for m in members if f"hidden.{m}" in self.slices] + (["text"] if "text" in self.slices else [])
        self.projections = nn.ModuleDict(
            {
                name.replace(".", "_"): nn.Sequential(nn.LayerNorm(self._size(name)), nn.Linear(self._size(name), config.embed), nn.Tanh())
                for name in vectors
            }
        )
        self.passthrough = [f"stats.{m}" for m in members] + ["shared"]
        self.size = config.embed * len(vectors) + sum(self._size(name) for name in self.passthrough)

    def _size(self, name: str) -> int:
        return self.slices[name].stop - self.slices[name].start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        parts = [projection(obs[:, self.slices[key.replace("_", ".")]]) for key, projection in self.projections.items()]
        return torch.cat(parts + [obs[:, self.slices[name]] for name in self.passthrough], dim=-1)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """State [B, D] -> concentrations alpha [B, M].

    Called as Tianshou calls actors, `actor(obs, state=None, info=None) -> (alpha, None)`, so the
    trainer wraps this very module in its policy.
    """

    def __init__(self, layout: StateLayout, n_members: int, config: NetworkConfig):
        super().__init__()
        self.n_members, self.config = n_members, config

    def concentrations(self, logits: torch.Tensor) -> torch.Tensor:
        return (self.config.alpha_min + nn.functional.softplus(logits)).clamp(max=self.config.alpha_max)

    def forward(self, obs, state=None, info=None):
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return self.concentrations(self.logits(obs)), state

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class JointActor(Actor):
    """RLAE_PPO: one network over the whole state, M outputs."""

    def __init__(self, layout: StateLayout, n_members: int, config: NetworkConfig):
        super().__init__(layout, n_members, config)
        self.encoder = StateEncoder(layout, list(range(n_members)), config)
        self.head = mlp([self.encoder.size, *config.hidden, n_members])

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))  # [B, M]


class MemberActors(Actor):
    """RLAE_MAPPO: one network per member m over member m's segments and the shared ones, 1 output each."""

    def __init__(self, layout: StateLayout, n_members: int, config: NetworkConfig):
        super().__init__(layout, n_members, config)
        self.encoders = nn.ModuleList(StateEncoder(layout, [m], config) for m in range(n_members))
        self.heads = nn.ModuleList(mlp([encoder.size, *config.hidden, 1]) for encoder in self.encoders)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(encoder(obs)) for encoder, head in zip(self.encoders, self.heads)], dim=-1)  # [B, M]


ACTORS = {"ppo": JointActor, "mappo": MemberActors}


# ----------------------------------------------------------------------------- checkpoints


class AgentCheckpointError(ValueError):
    """An agent that cannot be used here; the message says which file or which mismatch, and what to do."""


@dataclass
class AgentSpec:
    """What `agent.json` holds."""

    algorithm: str
    members: list[str]  # as given in `members=[...]`, in order
    vocab_fingerprints: list[str]  # MemberVocab.fingerprint of each
    state: str  # `members` or `text`
    layout: StateLayout
    span_length: int
    network: NetworkConfig = field(default_factory=NetworkConfig)
    text_encoder: str = TEXT_ENCODER
    training: dict = field(default_factory=dict)  # tasks, metrics, config, command: for people
    state_version: int = STATE_VERSION
    format: int = AGENT_FORMAT

    def to_json(self) -> dict:
        out = asdict(self)
        out["layout"] = self.layout.to_json()
        out["network"] = asdict(self.network) | {"hidden": list(self.network.hidden)}
        return out

    @classmethod
    def from_json(cls, data: dict) -> AgentSpec:
        data = dict(data)
        data["layout"] = StateLayout.from_json(data["layout"])
        data["network"] = NetworkConfig(**(data["network"] | {"hidden": tuple(data["network"]["hidden"])}))
        return cls(**data)

    def build_actor(self) -> Actor:
        return ACTORS[self.algorithm](self.layout, len(self.members), self.network)


def save_agent(directory: Path, spec: AgentSpec, actor: Actor) -> None:
    """Write the checkpoint beside `directory`, then swap it in: a kill never leaves half an agent,
    and a reader (`load_agent`) never sees the files of two writes."""
    from safetensors.torch import save_file

    with replacing_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in actor.state_dict().items()}, str(tmp / ACTOR_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")


def agent_dir(path_or_name: str) -> Path:
    """A checkpoint directory, or the name of a shipped agent (`lm_eval_rlae/agents/NAME`)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if (AGENTS_DIR / path_or_name).is_dir():
        return AGENTS_DIR / path_or_name
    shipped = sorted(p.name for p in AGENTS_DIR.iterdir() if p.is_dir()) if AGENTS_DIR.is_dir() else []
    raise AgentCheckpointError(
        f"agent={path_or_name!r} is neither a directory nor a shipped agent ({', '.join(shipped) or 'none'}): "
        "pass the directory rlae-train wrote (its `best` or `last` checkpoint) or one of the shipped names"
    )


def load_agent(path_or_name: str) -> tuple[AgentSpec, Actor]:
    """Read and check a checkpoint entirely before anything uses it: a clear error, never a partial load."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with reading_directory(agent_dir(path_or_name)) as directory:  # both files of one write
        spec_path, actor_path = directory / SPEC_FILE, directory / ACTOR_FILE
        for path in (spec_path, actor_path):
            if not path.is_file():
                raise AgentCheckpointError(f"agent {str(directory)!r} has no {path.name}: it is not a complete rlae-train checkpoint; retrain it or pass its `best`/`last` directory")
        spec_bytes, actor_bytes = spec_path.read_bytes(), actor_path.read_bytes()
    retrain = "rewrite it with rlae-train (or restore it from the shipped copy)"
    try:
        raw = json.loads(spec_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AgentCheckpointError(f"{spec_path} is not valid JSON ({error}): {retrain}") from error
    if not isinstance(raw, dict) or raw.get("format") != AGENT_FORMAT:
        raise AgentCheckpointError(f"{spec_path} is not an rlae agent of format {AGENT_FORMAT} (found {raw.get('format') if isinstance(raw, dict) else raw!r}): {retrain}")
    try:
        spec = AgentSpec.from_json(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise AgentCheckpointError(f"{spec_path} lacks or mangles a field ({error!r}): {retrain}") from error
    if spec.state_version != STATE_VERSION:
        raise AgentCheckpointError(
            f"{spec_path}: its state features are version {spec.state_version}, this lm-eval-rlae computes version "
            f"{STATE_VERSION}: retrain it with this version (rlae-train), or use the lm-eval-rlae it was trained with"
        )
    if spec.algorithm not in ALGORITHMS:
        raise AgentCheckpointError(f"{spec_path}: unknown algorithm {spec.algorithm!r} (known: {', '.join(ALGORITHMS)})")
    try:
        tensors = load(actor_bytes)
    except (SafetensorError, OSError) as error:
        raise AgentCheckpointError(f"{actor_path} cannot be read ({error}): the file is truncated or corrupt; {retrain}") from error
    actor = spec.build_actor()
    expected = actor.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    wrong = [k for k, v in tensors.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise AgentCheckpointError(
            f"{actor_path} does not match the network agent.json describes (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shapes {wrong[:3]}): {retrain}"
        )
    actor.load_state_dict(tensors)
    return spec, actor.eval()


class AgentPolicy(WeightPolicy):
    """A trained RLAE agent as a weight policy: state -> actor -> alpha / sum(alpha), once per span
    while generating and once per request while scoring. The trainer runs the very same object on
    the actor it is training, so its validation is evaluation."""

    def __init__(self, spec: AgentSpec, actor: Actor, features=None, source: str = "(being trained)"):
        super().__init__(len(spec.members))
        self.spec, self.actor, self.features, self.source = spec, actor, features, source
        self.needs_hidden = spec.state == "members"

    @classmethod
    def load(cls, path_or_name: str, member_names: list[str]) -> AgentPolicy:
        """A checkpoint, checked against the members' names before any model loads."""
        spec, actor = load_agent(path_or_name)
        if len(member_names) != len(spec.members):
            raise AgentCheckpointError(
                f"agent {str(path_or_name)!r} was trained for {len(spec.members)} members, members={_members_arg(spec.members)}, "
                f"not {len(member_names)}: its actor gives one weight per member it was trained with. Pass "
                f"members={_members_arg(spec.members)}, or train an agent for these {len(member_names)} members (rlae-train)"
            )
        if [str(name) for name in member_names] != spec.members:
            raise AgentCheckpointError(
                f"agent {str(path_or_name)!r} was trained for members={_members_arg(spec.members)} (in that order), not "
                f"members={_members_arg(member_names)}: pass members={_members_arg(spec.members)}, or train an agent for these members"
            )
        return cls(spec, actor, source=str(path_or_name))

    def bind(self, members: list, union) -> None:
        for name, member, fingerprint in zip(self.spec.members, members, self.spec.vocab_fingerprints):
            if member.vocab.fingerprint != fingerprint:
                raise AgentCheckpointError(
                    f"agent {self.source!r}: member {name!r} here has another vocabulary than the one the agent was "
                    "trained with (a different model under the same name): use the member it was trained with, or retrain"
                )
        if self.features is None:
            self.features = make_state_features(self.spec.state, members, union, self.spec.text_encoder)
        if self.features.layout != self.spec.layout:
            raise AgentCheckpointError(
                f"agent {self.source!r} expects the {self.spec.state!r} state laid out as {self.spec.layout.to_json()}, "
                f"but these members give {self.features.layout.to_json()}: retrain it for these members"
            )
        self.actor.to(members[0].device)

    @torch.no_grad()
    def weights(self, state: PolicyState) -> torch.Tensor:
        alpha, _ = self.actor(self.features(state))
        return alpha


def _members_arg(names) -> str:
    return "[" + ",".join(map(str, names)) + "]"

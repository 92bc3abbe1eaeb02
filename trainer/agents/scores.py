"""Members' scores of multiple-choice documents, computed once and kept on disk.

A multiple-choice episode's reward under any weights is a mixture of numbers that do not depend on
the weights: each member's per-token log-probs of each choice, and the state at the end of the
context. So each document is scored once (`FusionEngine.score`, the path `--model rlae` scores
with) and an epoch over cached documents runs no LLM forward at all.

One file per (members, state kind, task, split read): `<cache>/<identity>/<state>/<task>.<split>.safetensors`
(the split as the config maps it, `validation`, `validation[:80%]`: `TaskData.split`), the arrays
with their index in the file's metadata (the document keys, and a checksum of index and arrays), so
that one atomic write puts both in place; `identity` hashes each member's name,
vocabulary and weights, so another member (or a rebuilt adapter) never reads stale scores. A document
is found by its key; its requests are a function of it (the harness draws few-shot examples in
document order from a seeded generator, so the first N documents' contexts do not depend on N).

Processes share the cache (PPO and MAPPO trained side by side): a file grows under its lock (read
what is there, score what is missing, write the union), so the second process adds to what the first
wrote. A file that is damaged (truncated, another checksum, arrays that disagree with the index) is
scored again, with a warning; it is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from lm_eval_rlae.engine.fusion import FusionEngine, Scored
from lm_eval_rlae.files import locked, replacing_file
from lm_eval_rlae.policies.state import STATE_VERSION, StateFeatures
from trainer.agents.tasks import Document, TaskData

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: the index inside the safetensors file, with a checksum


@dataclass
class ScoredDocument:
    obs: np.ndarray  # [D] the state at the end of the context
    scored: list[list[Scored]]  # M x [choices]


def members_identity(members) -> str:
    """Which members these are: names, vocabularies, and a checksum of their weights."""
    digest = hashlib.sha256()
    for member in members:
        with torch.no_grad():
            checksum = sum(float(p.double().sum()) + 1e-3 * float(p.double().abs().sum()) for p in member.model.parameters())
        digest.update(f"{member.name}|{member.vocab.fingerprint}|{checksum:.12e}\n".encode())
    return digest.hexdigest()[:16]


class ScoreCache:
    def __init__(self, root: Path, engine: FusionEngine, features: StateFeatures, batch_docs: int = 8):
        self.engine, self.features, self.batch_docs = engine, features, batch_docs
        self.dir = Path(root) / members_identity(engine.members) / features.kind

    def documents(self, task: TaskData) -> list[ScoredDocument]:
        """Every document of the task's split, scored: those already on disk are read, only the others
        are scored (a run with more documents per task pays only for the new ones)."""
        path = self.dir / f"{task.name}.{task.split}.safetensors"
        with locked(path):  # another process filling this file waits, then reads what this one wrote
            cached = self._read(path)
            missing = [document for document in task.documents if document.key not in cached]
            if missing:
                cached |= dict(zip((document.key for document in missing), self._score(task, missing)))
                self._write(path, cached)
        return [cached[document.key] for document in task.documents]

    @torch.no_grad()
    def _score(self, task: TaskData, documents: list[Document]) -> list[ScoredDocument]:
        out = []
        for start in tqdm(range(0, len(documents), self.batch_docs), desc=f"scoring {task.name} ({task.split})", unit="batch"):
            batch = documents[start : start + self.batch_docs]
            pairs = [pair for document in batch for pair in document.pairs]
            scored = self.engine.score(pairs)  # M x [R]
            firsts = np.cumsum([0] + [len(document.requests) for document in batch])
            state = self.engine.decision_state([[per_member[i] for i in firsts[:-1]] for per_member in scored], [d.contexts[0] for d in batch])
            obs = self.features(state).numpy()
            scored = [[replace(s, decision_logprobs=None, decision_hidden=None) for s in per_member] for per_member in scored]  # [V] each
            for d in range(len(batch)):
                choices = slice(firsts[d], firsts[d + 1])
                out.append(ScoredDocument(obs[d], [per_member[choices] for per_member in scored]))
        return out

    def _write(self, path: Path, by_key: dict[str, ScoredDocument]) -> None:
        keys, documents = list(by_key), list(by_key.values())
        arrays = {"obs": np.stack([d.obs for d in documents]).astype(np.float32)}
        arrays["choices"] = np.cumsum([0] + [len(d.scored[0]) for d in documents]).astype(np.int64)
        for m in range(len(self.engine.members)):
            scored = [s for d in documents for s in d.scored[m]]
            arrays[f"logprobs.{m}"] = np.concatenate([s.token_logprobs for s in scored]).astype(np.float64)
            arrays[f"lengths.{m}"] = np.concatenate([s.token_lengths for s in scored]).astype(np.int64)
            arrays[f"tokens.{m}"] = np.cumsum([0] + [len(s.token_logprobs) for s in scored]).astype(np.int64)
            arrays[f"greedy.{m}"] = np.array([s.greedy for s in scored], dtype=np.uint8)
        index = json.dumps({"state_version": STATE_VERSION, "keys": keys, "members": [m.name for m in self.engine.members], "layout": self.features.layout.to_json()})
        with replacing_file(path) as tmp:
            save_file(arrays, str(tmp), metadata={"format": str(CACHE_FORMAT), "index": index, "sha256": _checksum(index, arrays)})

    def _read(self, path: Path) -> dict[str, ScoredDocument]:
        """{document key: scored} of the file, empty when there is none, or it is stale or damaged."""
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="np") as f:
                metadata = f.metadata() or {}
                arrays = {name: f.get_tensor(name) for name in f.keys()}
            if metadata.get("format") != str(CACHE_FORMAT):
                logger.info("%s is of another format: scoring again", path)
                return {}
            if metadata.get("sha256") != _checksum(metadata.get("index", ""), arrays):
                raise ValueError("its checksum does not match its content")
            index = json.loads(metadata["index"])
            if index["state_version"] != STATE_VERSION or index["layout"] != self.features.layout.to_json():
                logger.info("%s is stale (another state layout): scoring again", path)
                return {}
            return self._documents(index["keys"], arrays)
        except (SafetensorError, OSError, ValueError, KeyError, IndexError) as error:
            logger.warning("%s is damaged (%s): it is ignored, and its documents are scored again", path, error)
            return {}

    def _documents(self, keys: list[str], arrays: dict[str, np.ndarray]) -> dict[str, ScoredDocument]:
        choices = arrays["choices"]  # [documents + 1] offsets into the requests
        if not (len(arrays["obs"]) == len(keys) == len(choices) - 1):
            raise ValueError(f"{len(keys)} keys, {len(arrays['obs'])} states and {len(choices) - 1} documents of choices")
        members = []
        for m in range(len(self.engine.members)):
            tokens = arrays[f"tokens.{m}"]  # [requests + 1] offsets into the tokens
            if not (len(tokens) - 1 == choices[-1] == len(arrays[f"greedy.{m}"]) and len(arrays[f"logprobs.{m}"]) == len(arrays[f"lengths.{m}"]) == tokens[-1]):
                raise ValueError(f"the arrays of member {m} disagree with the index")
            members.append(
                [
                    Scored(
                        token_logprobs=arrays[f"logprobs.{m}"][tokens[r] : tokens[r + 1]],
                        token_lengths=arrays[f"lengths.{m}"][tokens[r] : tokens[r + 1]],
                        greedy=bool(arrays[f"greedy.{m}"][r]),
                        decision_logprobs=None,
                        decision_hidden=None,
                    )
                    for r in range(len(tokens) - 1)
                ]
            )
        return {
            key: ScoredDocument(arrays["obs"][d], [per_member[choices[d] : choices[d + 1]] for per_member in members])
            for d, key in enumerate(keys)
        }


def _checksum(index: str, arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the index and of every array's name, dtype, shape and bytes."""
    digest = hashlib.sha256(index.encode())
    for name in sorted(arrays):
        digest.update(f"{name}|{arrays[name].dtype}|{arrays[name].shape}".encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()

"""Members' scores of multiple-choice documents, computed once and kept on disk.

A multiple-choice episode's reward under any weights is a mixture of numbers that do not depend on
the weights: each member's per-token log-probs of each choice, and the state at the end of the
context. So each document is scored once (`FusionEngine.score`, the path `--model rlae` scores
with) and an epoch over cached documents runs no LLM forward at all.

One file per (members, state kind, task, split read): `<cache>/<identity>/<state>/<task>.<split>.safetensors`
(the split as the config maps it, `validation`, `validation[:80%]`: `TaskData.split`) with the arrays, beside a JSON with the document keys; `identity` hashes each member's name,
vocabulary and weights, so another member (or a rebuilt adapter) never reads stale scores. A document
is found by its key; its requests are a function of it (the harness draws few-shot examples in
document order from a seeded generator, so the first N documents' contexts do not depend on N).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from lm_eval_rlae.engine.fusion import FusionEngine, Scored
from lm_eval_rlae.policies.state import STATE_VERSION, StateFeatures
from trainer.agents.tasks import Document, TaskData

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        meta = {"format": CACHE_FORMAT, "state_version": STATE_VERSION, "keys": keys, "members": [m.name for m in self.engine.members], "layout": self.features.layout.to_json()}
        path.with_suffix(".json").write_text(json.dumps(meta))
        os.replace(tmp, path)  # last: the arrays exist only once complete

    def _read(self, path: Path) -> dict[str, ScoredDocument]:
        """{document key: scored} of the file, empty when there is none or it is stale."""
        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file()):
            return {}
        meta = json.loads(meta_path.read_text())
        expected = {"format": CACHE_FORMAT, "state_version": STATE_VERSION, "layout": self.features.layout.to_json()}
        if any(meta.get(key) != value for key, value in expected.items()):
            logger.info("%s is stale (another format or state layout): scoring again", path)
            return {}
        keys = meta["keys"]
        arrays = load_file(str(path))
        choices = arrays["choices"]
        members = []
        for m in range(len(self.engine.members)):
            tokens = arrays[f"tokens.{m}"]
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

"""rlae-screen's measurement on documents made up so that the answer is known: a state feature that
says which member is right is found (policy near the per-document oracle, AUC near 1); one that
says nothing is not (policy no better than the best fixed weights, AUC near 0.5)."""

from __future__ import annotations

import numpy as np

from lm_eval_rlae.policies.state import StateLayout
from trainer.agents.fixed_weights import simplex_grid
from trainer.agents.screen import Documents, feature_sets, screen

MEMBERS = ["a", "b"]
LAYOUT = StateLayout((("hidden.0", 3), ("stats.0", 1), ("stats.1", 1), ("shared", 1)))


def _documents(informative: bool, n: int = 600, seed: int = 0) -> Documents:
    """Two tasks; on each document member a or member b alone is right (b on 70% of them), or both."""
    rng = np.random.default_rng(seed)
    grid = np.array(simplex_grid(2, 0.25))  # [5, 2]: (0, 1) ... (1, 0)
    b_right = rng.random(n) < 0.7
    both = rng.random(n) < 0.2
    # a document's metric under weights w: the member holding more weight answers (ties: both right or b)
    rewards = np.array([[1.0 if both[d] else float(b_right[d] if w[1] >= w[0] else not b_right[d]) for w in grid] for d in range(n)])
    signal = np.where(b_right, 1.0, -1.0) + 0.3 * rng.standard_normal(n) if informative else rng.standard_normal(n)
    obs = np.column_stack([rng.standard_normal((n, 3)), signal, rng.standard_normal(n), rng.standard_normal(n)])
    return Documents(rewards, obs, np.arange(n) % 2, ["t0", "t1"], grid)


def test_a_feature_that_tells_which_member_is_right_is_found():
    documents = _documents(informative=True)
    result = screen(documents, feature_sets(documents, LAYOUT), MEMBERS)
    for setting in ("in distribution", "leave-one-task-out"):
        scores = result[setting]
        assert scores["per-document oracle"] == 1.0
        assert scores["policy: confidence"] > 0.97 and scores["policy: confidence"] > scores["routing"] + 0.15, scores
        assert abs(scores["policy: task"] - scores["b alone"]) < 0.03, scores  # the task one-hot knows only what routing knows
    assert result["which member"]["confidence"] > 0.95
    assert abs(result["which member"]["task"] - 0.5) < 0.1
    assert set(result["which member"]) == {"confidence", "task", "confidence + task", "whole state"}


def test_a_feature_that_says_nothing_gives_the_best_fixed_weights_and_chance():
    documents = _documents(informative=False)
    result = screen(documents, feature_sets(documents, LAYOUT), MEMBERS)
    scores = result["in distribution"]
    assert scores["policy: confidence"] <= scores["best fixed"] + 0.02, scores
    assert scores["per-document oracle"] - scores["best fixed"] > 0.2  # the headroom is there, unreachable
    assert all(abs(auc - 0.5) < 0.1 for auc in result["which member"].values()), result["which member"]
    assert result["documents"]["exactly one member right"] == int((documents.rewards[:, 0] != documents.rewards[:, -1]).sum())

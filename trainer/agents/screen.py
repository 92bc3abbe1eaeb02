"""`rlae-screen`: what can a per-document policy know from a state, before any agent trains?

    rlae-screen --config trainer/configs/plain.yaml [--step 0.1] [--output results/screen/plain]

An agent beats routing (each task sent to its better member) only where its state tells, document by
document, which weighting is right. This measures that ceiling on the cached multiple-choice scores of
the config's train and validation documents (generation tasks are left out: a document's reward under
a weighting would cost a decode). Every document is scored under every point of a weight grid (the
members alone are its corners). A policy linear in a set of state features predicts each document's
reward under every grid point (ridge regression, its strength chosen by cross-validation on the fitting
documents) and takes the point predicted best; it is fitted on some documents and scored on the others:
- in distribution: 5-fold cross-validation over documents;
- transfer: leave-one-task-out.
Beside it, on the same held-out documents: each member alone, uniform, the best fixed weights and
routing (both chosen on the fitting documents; on a task left out, routing knows nothing and falls back
to the best fixed weights), and the per-document oracle of the members. And where exactly one member
alone is right, how well each feature set tells which (a logistic classifier's cross-validated ROC AUC:
0.5 is no information).

Feature sets, from the state's layout: `confidence` (each member's entropy, top-1 and margin, their
agreement, and on questions their confidence over the choices: the `stats.*` and `shared` segments),
the `whole state` (hidden states or text embedding too, where the state has them), the `task` (a
one-hot: what routing knows) and `confidence + task`. Output: `screen.md` and `screen.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

FOLDS = 5
ALPHAS = np.logspace(-2, 4, 7)  # ridge strengths tried (cross-validated on the fitting documents)


@dataclasses.dataclass
class Documents:
    rewards: np.ndarray  # [D, G] each document's metric under each grid point
    obs: np.ndarray  # [D, F] the state at the end of its context
    task: np.ndarray  # [D] index into `tasks`
    tasks: list[str]
    grid: np.ndarray  # [G, M] weights; the members alone among them

    def corners(self) -> list[int]:
        """[M] the grid index of each member alone."""
        return [int(np.flatnonzero(np.isclose(self.grid[:, m], 1.0))[0]) for m in range(self.grid.shape[1])]

    def one_member_right(self) -> tuple[np.ndarray, np.ndarray]:
        """[D] whether exactly one member alone scores best on the document, and [D] which one."""
        alone = self.rewards[:, self.corners()]  # [D, M]
        return (alone == alone.max(1, keepdims=True)).sum(1) == 1, alone.argmax(1)


def cached_documents(run, grid: list[tuple[float, ...]]) -> Documents:
    """The multiple-choice documents of `run`'s train and validation splits, from the score cache."""
    import torch

    from trainer.agents.env import mixed_reward

    names = list(run.scored["train"])  # the multiple-choice tasks: only they are cached
    weights = [torch.tensor(w, dtype=torch.float32) for w in grid]
    rewards, obs, task = [], [], []
    for split in ("train", "validation"):
        for t, name in enumerate(names):
            for document, scored in zip(run.tasks[split][name].documents, run.scored[split][name]):
                rewards.append([mixed_reward(document, scored, w) for w in weights])
                obs.append(scored.obs)
                task.append(t)
    return Documents(np.array(rewards), np.stack(obs), np.array(task), names, np.array(grid))


def feature_sets(documents: Documents, layout) -> dict[str, np.ndarray]:
    """name -> [D, F'] the state features a policy is allowed to read."""
    slices = layout.slices()
    confidence = np.concatenate([np.arange(s.start, s.stop) for name, s in slices.items() if name.startswith("stats.") or name == "shared"])
    task = np.eye(len(documents.tasks))[documents.task]
    out = {"confidence": documents.obs[:, confidence], "task": task, "confidence + task": np.hstack([documents.obs[:, confidence], task])}
    if len(confidence) < documents.obs.shape[1]:
        out["whole state"] = documents.obs
    return out


def held_out_scores(documents: Documents, features: dict, members: list[str], fit: np.ndarray, held: np.ndarray) -> dict[str, np.ndarray]:
    """label -> [held] each method's rewards on the `held` documents, all of it chosen on the `fit` ones."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    R, corners, rows = documents.rewards, documents.corners(), np.flatnonzero(held)
    fixed = int(R[fit].mean(0).argmax())
    uniform = int(np.abs(documents.grid - 1 / len(members)).sum(1).argmin())
    route = {t: corners[int(R[fit & (documents.task == t)][:, corners].mean(0).argmax())] if (fit & (documents.task == t)).any() else fixed
             for t in range(len(documents.tasks))}
    out = {f"{name} alone": R[held, c] for name, c in zip(members, corners)}
    out |= {"uniform": R[held, uniform], "best fixed": R[held, fixed], "routing": R[rows, [route[t] for t in documents.task[held]]],
            "per-document oracle": R[held][:, corners].max(1)}
    for name, X in features.items():
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(X[fit], R[fit])  # one output per grid point
        out[f"policy: {name}"] = R[rows, model.predict(X[held]).argmax(1)]  # [held] the point predicted best
    return out


def which_member(documents: Documents, features: dict, seed: int) -> dict[str, float | None]:
    """name -> cross-validated ROC AUC of telling which member is right where exactly one alone is
    (one-vs-rest for more than two members); None where there are too few such documents."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    one, right = documents.one_member_right()
    y = right[one]
    if len(set(y)) < 2 or np.bincount(y).min() < FOLDS:
        return {name: None for name in features}
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    out = {}
    for name, X in features.items():
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))  # L2: hidden states are wide
        p = cross_val_predict(classifier, X[one], y, cv=folds, method="predict_proba")
        out[name] = float(roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr"))
    return out


def screen(documents: Documents, features: dict, members: list[str], seed: int = 0) -> dict:
    """{"in distribution": {label: mean reward}, "leave-one-task-out": {...}, "which member": {features: AUC}, "documents": {...}}."""
    folds = np.random.default_rng(seed).permutation(len(documents.task)) % FOLDS
    settings = {
        "in distribution": [(folds != k, folds == k) for k in range(FOLDS)],
        "leave-one-task-out": [(documents.task != t, documents.task == t) for t in range(len(documents.tasks))],
    }
    out = {}
    for setting, pairs in settings.items():
        parts = [held_out_scores(documents, features, members, fit, held) for fit, held in pairs]
        out[setting] = {label: float(np.concatenate([p[label] for p in parts]).mean()) for label in parts[0]}
    out["which member"] = which_member(documents, features, seed)
    out["documents"] = {"total": len(documents.task), "exactly one member right": int(documents.one_member_right()[0].sum())}
    return out


def markdown(result: dict) -> str:
    settings = ["in distribution", "leave-one-task-out"]
    lines = ["| method | in distribution (5-fold over documents) | leave-one-task-out |", "| --- | --- | --- |"]
    lines += [f"| {label} | " + " | ".join(f"{100 * result[s][label]:.1f}" for s in settings) + " |" for label in result[settings[0]]]
    docs = result["documents"]
    lines += ["", (f"Where exactly one member alone is right ({docs['exactly one member right']} of {docs['total']} documents), "
                   "how well each feature set tells which (5-fold ROC AUC; 0.5 is no information):"), "",
              "| features | AUC |", "| --- | --- |"]
    lines += [f"| {name} | {'n/a' if auc is None else f'{auc:.3f}'} |" for name, auc in result["which member"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lm_eval_rlae.files import write_text
    from trainer.agents.fixed_weights import simplex_grid
    from trainer.agents.run import Run, load_config

    parser = argparse.ArgumentParser(prog="rlae-screen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an rlae-train config (members, state, tasks, train_docs, val_docs)")
    parser.add_argument("--step", type=float, default=0.1, help="weight grid step on the simplex (default %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="default results/screen/<config name>")
    args = parser.parse_args(argv)
    config = load_config(args.config, {})
    # every task, held out or not: the screen leaves tasks out itself; nothing is decoded, only the
    # multiple-choice documents are scored (or read from the cache)
    run = Run(dataclasses.replace(config, holdout=[], folds=[], fold=None), splits=("train", "validation"))
    if not run.scored["train"]:
        raise SystemExit(f"{args.config} has no multiple-choice task: the screen reads cached scores of questions")
    if dropped := sorted(set(run.tasks["train"]) - set(run.scored["train"])):
        print(f"note: {dropped} generate: left out (a document's reward under a weighting would cost a decode)", flush=True)
    documents = cached_documents(run, simplex_grid(len(config.members), args.step))
    result = screen(documents, feature_sets(documents, run.features.layout), list(config.members))
    output = args.output or Path("results") / "screen" / args.config.stem
    text = markdown(result)
    write_text(output / "screen.md", text)
    write_text(output / "screen.json", json.dumps(result | {"config": str(args.config), "tasks": documents.tasks}, indent=2) + "\n")
    print(text + f"written: {output / 'screen.md'}, screen.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

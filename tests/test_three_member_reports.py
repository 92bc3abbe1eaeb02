"""`rlae-compare`'s methods, table and plots, `rlae-best-fixed`'s grid and the benchmark with three
members: every code path that once had two members in mind. (The harness runs behind `rlae-compare`
are tested in tests/test_agents.py; the real three-member run is in the README.)"""

from __future__ import annotations

import re

import numpy as np
import pytest


def test_compare_methods_table_and_plots_name_three_members(tmp_path, bpe_member, sp_member, unigram_member):
    from lm_eval_rlae.compare.config import CompareConfig, methods, short_names
    from lm_eval_rlae.compare.report import accuracy_plot, markdown, summarize, weight_plots

    members = [bpe_member, sp_member, unigram_member]
    config = CompareConfig(members=members, tasks=["t1", "t2"], best_fixed=[0.2, 0.3, 0.5], agents={"RLAE_PPO": "some-agent"})
    names = short_names(members)
    assert names == ["bpe", "sp", "unigram"]
    plan = methods(config)
    alone = [f"{name} alone" for name in names]
    assert list(plan) == [*alone, "uniform", "perplexity", "best fixed", "RLAE_PPO"]
    assert [plan[label] for label in alone] == [("hf", f"pretrained={m},dtype=float32") for m in members]
    assert plan["best fixed"] == ("rlae", f"members=[{','.join(members)}],weights=[0.2,0.3,0.5]")

    # member m is right on the documents d with d % 3 == m; the agent on all but one
    docs = [str(d) for d in range(12)]
    scores = {label: {t: {d: float(int(d) % 3 == m) for d in docs} for t in config.tasks} for m, label in enumerate(alone)}
    scores |= {label: {t: {d: float(int(d) % 2 == 0) for d in docs} for t in config.tasks} for label in ("uniform", "perplexity", "best fixed")}
    scores["RLAE_PPO"] = {t: {d: float(d != "0") for d in docs} for t in config.tasks}
    summary = summarize(scores)
    assert list(summary["overall"]) == [*alone, "uniform", "perplexity", "best fixed", "RLAE_PPO", "oracle routing", "per-document oracle"]
    assert summary["overall"]["per-document oracle"]["acc"] == 1.0  # one of three is right on every document
    assert summary["overall"]["oracle routing"]["acc"] == pytest.approx(1 / 3)
    assert summary["paired"]["RLAE_PPO"]["best single member"][0] == pytest.approx(11 / 12 - 1 / 3)
    cost = {label: {"generate_until": {"seconds": 1.0, "requests": 2}, "loglikelihood": {"seconds": 1.0, "requests": 4},
                    "generated_tokens": 8, "seconds": 3.0, "peak_rss_gib": 1.0, "peak_gpu_gib": None} for label in scores}
    table = markdown(summary, cost, "caption")
    assert re.search(r"^\| task \| n \| bpe alone \| sp alone \| unigram alone \| uniform \|", table, flags=re.M)
    assert re.search(r"^\| RLAE_PPO \| \+58\.3 \[", table, flags=re.M)

    accuracy_plot(summary, tmp_path / "accuracy.png", "three members")
    # {label: {task: {doc: {span: weights}}}}, as compare.report.per_document reads the decisions files
    decisions = {"RLAE_PPO": {t: {d: {span: list(np.roll([0.6, 0.3, 0.1], int(d))) for span in range(3)} for d in docs} for t in config.tasks}}
    written = weight_plots(decisions, members, tmp_path)
    assert written == [tmp_path / "weights_RLAE_PPO.png"]
    assert all(path.stat().st_size > 1000 for path in (tmp_path / "accuracy.png", *written))


def test_best_fixed_grid_covers_the_simplex_of_three():
    from trainer.agents.fixed_weights import simplex_grid

    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15  # (4 + 2 choose 2)
    assert all(len(w) == 3 and min(w) >= 0 and sum(w) == pytest.approx(1) for w in grid)
    assert len(set(grid)) == 15 and (0.0, 0.0, 1.0) in grid and (0.25, 0.25, 0.5) in grid


def test_benchmark_with_three_members(bpe_member, sp_member, unigram_member, capsys):
    from lm_eval_rlae.benchmark import main

    main(["--members", f"{bpe_member},{sp_member},{unigram_member}", "--prompts", "3", "--max-gen-toks", "3", "--batch-size", "2",
          "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| (\d+) / (\d+) \|$", out, flags=re.M)
    assert [label for label, *_ in rows] == [f"{m} alone (hf)" for m in (bpe_member, sp_member, unigram_member)] + ["members, sum", "rlae uniform", "rlae speculative"]
    assert abs(sum(float(g) for _, g, *_ in rows[:3]) - float(rows[3][1])) <= 0.016  # printed to 2 decimals
    assert re.search(r"^rlae uniform / members, batch 2: generate_until \d+\.\d\d, loglikelihood \d+\.\d\d", out, flags=re.M)

"""The benchmark command runs the members alone and the ensemble on the same requests (on every
device present: `device`), and its arithmetic."""

import re

import pytest
import torch

from lm_eval_rlae.benchmark import PeakMemory, Run, main, report


def test_benchmark_prints_each_run_and_the_ratios_per_batch_size(bpe_member, sp_member, device, capsys, monkeypatch):
    """Each weighting step by step and speculative (with its acceptance and tokens per verify pass:
    rounds forced, as the engine would otherwise use plain steps where they measure faster)."""
    from lm_eval_rlae.engine.speculative import Drafting

    monkeypatch.setattr(Drafting, "speculates", lambda self, batch: True)
    results = main(["--members", f"{bpe_member},{sp_member}", "--prompts", "3", "--max-gen-toks", "4", "--batch-size", "1,2",
                    "--repeats", "2", "--devices", f"{device},{device}", "--dtype", "float32", "--gate", "0.5"])
    out = capsys.readouterr().out
    assert "3 prompts x 4 new tokens" in out and "12 loglikelihood requests" in out and "fastest of 2 rounds" in out
    assert f"devices {device}, {device}, dtypes float32, float32," in out
    assert list(results) == [1, 2] and all(result["table"] in out for result in results.values())
    tables = re.split(r"^batch size (\d+)$", out, flags=re.M)[1:]
    assert tables[::2] == ["1", "2"]
    for batch_size, table in zip(tables[::2], tables[1::2]):
        rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| (\d+) / (\d+) \|$", table, flags=re.M)
        labels = [label for label, *_ in rows]
        ensembles = ["rlae uniform", "rlae speculative", "rlae uniform, gate=0.5", "rlae speculative, gate=0.5"]
        assert labels == [f"{bpe_member} alone (hf)", f"{sp_member} alone (hf)", "members, sum", *ensembles]
        (_, g1, s1, m1, _), (_, g2, s2, m2, _), (_, g_sum, s_sum, m_sum, _), *_ = rows
        for part_a, part_b, total in ((g1, g2, g_sum), (s1, s2, s_sum)):  # printed to 2 decimals
            assert abs(float(part_a) + float(part_b) - float(total)) <= 0.011
        assert abs(int(m1) + int(m2) - int(m_sum)) <= 1  # MiB, rounded
        for label in ensembles:
            drafted = r", acceptance [01]\.\d\d, tokens per verify pass \d+\.\d\d \([1-9]\d* verify passes, 0 plain steps\)" if "speculative" in label else ""
            assert re.search(rf"^{re.escape(label)} / members, batch {batch_size}: generate_until \d+\.\d\d, loglikelihood \d+\.\d\d, "
                             rf"peak memory \d+\.\d\d / \d+\.\d\d{drafted}$", table, flags=re.M)


def test_benchmark_stops_when_speculation_changes_the_output(bpe_member, sp_member, monkeypatch):
    """Both paths must generate the same texts; a speculative path that changed one is a failure, said loudly."""
    from lm_eval_rlae.lm import RLAELM

    generate = RLAELM.generate_until

    def changed(self, requests, disable_tqdm=False):
        texts = generate(self, requests, disable_tqdm)
        return [text + "!" for text in texts] if self.engine.speculative else texts

    monkeypatch.setattr(RLAELM, "generate_until", changed)
    with pytest.raises(SystemExit, match="rlae speculative generated other texts than rlae uniform"):
        main(["--members", f"{bpe_member},{sp_member}", "--prompts", "2", "--max-gen-toks", "2", "--batch-size", "2", "--repeats", "1"])


def test_one_hot_weights_are_measured_against_the_chosen_member_alone(bpe_member, sp_member, capsys):
    """`--weights 0,1`: one more pair of runs, its ratio over the member with the weight alone; the
    speculative one verifies nothing (one member has weight) and says so."""
    main(["--members", f"{bpe_member},{sp_member}", "--prompts", "2", "--max-gen-toks", "3", "--batch-size", "2", "--repeats", "1",
          "--device", "cpu", "--weights", "0,1"])
    out = capsys.readouterr().out
    ratio = r"batch 2: generate_until \d+\.\d\d, loglikelihood \d+\.\d\d, peak memory \d+\.\d\d / \d+\.\d\d"
    assert re.search(rf"^rlae weights=\[0,1\] / {re.escape(sp_member)} alone, {ratio}$", out, flags=re.M)
    assert re.search(rf"^rlae speculative weights=\[0,1\] / {re.escape(sp_member)} alone, {ratio}, no verify pass \(one member with weight decodes alone\)$", out, flags=re.M)
    assert re.search(rf"^rlae speculative / members, {ratio}, acceptance", out, flags=re.M)


def test_devices_reach_the_ensemble(bpe_member, sp_member):
    """--devices is the ensemble's `devices=`: one device for two members is refused before any model loads."""
    with pytest.raises(ValueError, match="devices has 1 values for 2 members"):
        main(["--members", f"{bpe_member},{sp_member}", "--devices", "cpu"])


def test_members_on_their_own_devices_are_measured_against_the_slowest():
    """On one device the floor is the sum of the members' times; each on its own, their forwards
    overlap and the floor is the slowest member alone. Memory is the sum either way."""
    runs = []
    for label, generate_s, score_s, weights in (("a alone", 2.0, 1.0, 100), ("b alone", 4.0, 0.5, 300), ("rlae", 4.4, 1.2, 400)):
        run = Run(label, None, None, weights)
        run.times = {"generate": [generate_s + 1, generate_s], "score": [score_s]}  # the fastest round counts
        run.extra = {"generate": [0, 0], "score": [0]}
        runs.append(run)
    assert "rlae / members, batch 8: generate_until 0.73, loglikelihood 0.80, peak memory 1.00 / 1.00" in report(runs, 2, 8)
    assert "rlae / slowest member, batch 8: generate_until 1.10, loglikelihood 1.20, peak memory 1.00 / 1.00" in report(runs, 2, 8, own_devices=True)


def test_peak_memory_sees_what_a_block_allocates_and_frees(device):
    with PeakMemory([torch.device(device)]) as small:
        torch.ones(2**10, device=device).sum()
    with PeakMemory([torch.device(device)]) as large:
        block = torch.ones(2**26, device=device)  # 256 MiB, written, then freed before the block ends
        del block
    assert large.extra >= 250 * 2**20 > small.extra

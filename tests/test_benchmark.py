"""The benchmark command runs the members alone and the ensemble on the same requests."""

import re

from lm_eval_rlae.benchmark import main


def test_benchmark_prints_each_run_and_the_ratios(bpe_member, sp_member, capsys):
    main(["--members", f"{bpe_member},{sp_member}", "--prompts", "3", "--max-gen-toks", "4", "--batch-size", "2", "--device", "cpu", "--gate", "0.5"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| n/a \|$", out, flags=re.M)
    assert [label for label, *_ in rows] == [f"{bpe_member} alone (hf)", f"{sp_member} alone (hf)", "members, sum", "rlae uniform", "rlae uniform, gate=0.5"]
    (_, g1, s1), (_, g2, s2), (_, g_sum, s_sum), *_ = rows
    for part_a, part_b, total in ((g1, g2, g_sum), (s1, s2, s_sum)):  # printed to 2 decimals
        assert abs(float(part_a) + float(part_b) - float(total)) <= 0.011
    for label in ("rlae uniform", "rlae uniform, gate=0.5"):
        assert re.search(rf"{label} / members: generate_until \d+\.\d\d, loglikelihood \d+\.\d\d", out)
    assert "3 prompts x 4 new tokens" in out and "12 loglikelihood requests" in out

"""`make gpu-check`: without CUDA it says so and runs nothing; its synchronisation count and its table
are checked here on CPU (where nothing synchronises) with stand-ins for what only a GPU gives."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from lm_eval_rlae import gpu_check


def test_without_cuda_it_says_why_and_runs_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_tests", lambda *_: pytest.fail("ran the tests"))
    assert gpu_check.main(["--output", str(tmp_path / "table.md")]) == 0
    assert capsys.readouterr().out.startswith("gpu-check: no CUDA device, so nothing was run: torch.cuda.is_available() is False (torch ")
    assert not (tmp_path / "table.md").exists()


@pytest.mark.skipif(gpu_check.no_cuda_reason() is None, reason="a CUDA device is present: make gpu-check runs for real there")
def test_make_target_exits_cleanly_without_cuda(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lm_eval_rlae.gpu_check", "--output", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no CUDA device, so nothing was run" in out.stdout, out.stdout + out.stderr


@pytest.mark.filterwarnings("ignore:called a synchronizing", "ignore:another warning")  # those of the warm-up, not counted
def test_syncs_are_counted_per_decoding_step(monkeypatch, bpe_member, sp_member):
    """One stand-in synchronisation per chosen token: the count per step is 1, the prompt's forward aside."""
    from lm_eval_rlae.engine.fusion import Generation
    from lm_eval_rlae.lm import RLAELM

    choose = Generation._choose

    def choose_and_sync(self, probs):
        warnings.warn(gpu_check.SYNC_MESSAGE)  # as torch.cuda.set_sync_debug_mode("warn") does
        warnings.warn("another warning")  # not counted
        return choose(self, probs)

    monkeypatch.setattr(Generation, "_choose", choose_and_sync)
    lm = RLAELM(members=[bpe_member, sp_member], device="cpu", batch_size=4)
    per_step, one_token, where = gpu_check.syncs_per_step(lm.generate_until, n_prompts=4, new_tokens=5)
    assert (per_step, one_token) == (1.0, 1)
    assert list(where) == [f"test_gpu_check.py:{choose_and_sync.__code__.co_firstlineno + 1}"]


def test_the_table_holds_every_part(monkeypatch, tmp_path, capsys):
    """The CUDA path's assembly, with stand-ins for the GPU's parts: one summary table, then details;
    a part that cannot run is a row that says why, and the exit status is 1."""
    monkeypatch.setattr(gpu_check, "no_cuda_reason", lambda: None)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda _: "Stand-in GPU")
    monkeypatch.setattr(gpu_check, "run_tests", lambda _: ("3 passed in 9 s", [("tests/test_x.py::test_a[cuda]", "passed", 1.5)] * 3, True))
    monkeypatch.setattr(gpu_check, "sync_rows", lambda members: [("rlae uniform", "7 (one-token generation: 30)", "fusion.py:1 (4)")])
    ratios = {"rlae uniform": {"generate": 1.1, "score": 0.5, "generate_memory": 1.0, "score_memory": 0.8}}

    def benchmark(argv):
        if "bfloat16" in argv:
            raise RuntimeError("bfloat16 is not supported here")
        return {1: {"table": "batch size 1\n| run | ... |", "ratios": ratios}}

    monkeypatch.setattr("lm_eval_rlae.benchmark.main", benchmark)
    assert gpu_check.main(["--members", "a,b", "--output", str(tmp_path / "gpu.md")]) == 1
    table = (tmp_path / "gpu.md").read_text()
    assert table in capsys.readouterr().out
    assert table.startswith("# gpu-check: Stand-in GPU, torch ")
    for row in ("| tests on cuda (`pytest -m cuda`) | 3 passed in 9 s |",
                "| host syncs per decoding step, batch 8: rlae uniform | 7 (one-token generation: 30) |",
                "| benchmark float32, batch 1: rlae uniform / members | generate_until 1.10, loglikelihood 0.50, peak memory 1.00 / 0.80 |",
                "| benchmark, bfloat16 | not run: bfloat16 is not supported here |",
                "| tests/test_x.py::test_a[cuda] | passed | 1.5 |",
                "## Benchmark, float32, both members on cuda:0"):
        assert row in table, row

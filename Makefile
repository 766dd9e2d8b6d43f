# The two set-up commands: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-ref bench fixtures clean experiment-gpt1 experiment-fewshot experiment-rlhf

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/npgpt generate "ROMEO:" --max-new-tokens 300 --seed 1

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Also run the live reference checks against PyTorch / transformers / tiktoken.
test-ref: $(STAMP)
	$(BIN)/pip install -q -e ".[test,ref]"
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[ref]"
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/matmul.py
	$(BIN)/python benchmarks/breakdown.py

# Regenerate the committed reference fixtures (needs torch).
fixtures: $(STAMP)
	$(BIN)/python tests/make_fixtures.py

# GPT-1: pretraining + fine-tuning beats training on the labels alone (SST-2 is not shipped: point at it)
SST2 ?= ../shared/data/sst2
WARPEACE ?= ../shared/data/warpeace/warpeace_input.txt
LAMBADA ?= ../shared/data/lambada/lambada_test.jsonl
WIKITEXT ?= ../shared/data/wikitext2/valid.txt
experiment-gpt1: $(STAMP)
	$(BIN)/python examples/gpt1_sst2.py --sst2 $(SST2) --warpeace $(WARPEACE) --lambada $(LAMBADA) --wikitext $(WIKITEXT)

# GPT-3: accuracy rises with the number of in-context demonstrations
experiment-fewshot: $(STAMP)
	$(BIN)/python examples/fewshot_icl.py

# InstructGPT: pretrain -> SFT -> reward model -> PPO (with/without KL, with ptx) and DPO on a hidden rule
experiment-rlhf: $(STAMP)
	$(BIN)/python examples/rlhf_synthetic.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

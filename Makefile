# The two set-up commands: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-ref fuzz bench fixtures clean imdb-model experiment-gpt1 experiment-banded experiment-fewshot experiment-rlhf experiment-scaling experiment-exposure

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,scale,serve,mpi]"
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

# Long property-based runs (tests marked fuzz, which `make test` skips; see tests/fuzzing.py):
#   make fuzz                    FUZZ_EXAMPLES (default 2000) random examples per property
#   make fuzz FUZZ_SECONDS=60    each property draws new rounds of examples for 60 s
#   make fuzz FUZZ_MINUTES=30    a 30-minute campaign: the time is split evenly over the fuzz tests
FUZZ_SECONDS ?= 0
FUZZ_MINUTES ?=
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	@secs=$(FUZZ_SECONDS); if [ -n "$(FUZZ_MINUTES)" ]; then \
	  n=$$($(BIN)/python -m pytest -q --collect-only -m fuzz tests | grep -c '::'); \
	  secs=$$(( $(FUZZ_MINUTES) * 60 / (n > 0 ? n : 1) )); echo "fuzz: $$n tests, $$secs s each"; fi; \
	NPGPT_FUZZ_SECONDS=$$secs NPGPT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -m fuzz tests

# This workplace pins OpenBLAS to its Haswell kernels ($OPENBLAS_CORETYPE, $OPENBLAS_L2_SIZE) for older
# builds that fail on some CPUs; NumPy's current OpenBLAS picks its kernels itself, as on a user's machine,
# so the benchmarks run without the pin (each prints the kernels that ran). Tests and CI keep it.
BENCH = env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[ref]"
	$(BENCH) benchmarks/run.py
	$(BENCH) benchmarks/decode.py
	$(BENCH) benchmarks/oversubscribe.py
	$(BENCH) benchmarks/startup.py
	$(BENCH) benchmarks/attention.py
	$(BENCH) benchmarks/banded.py
	$(BENCH) benchmarks/matmul.py
	$(BENCH) benchmarks/breakdown.py
	$(BENCH) benchmarks/mpi.py
	$(BENCH) benchmarks/label.py
	$(BENCH) benchmarks/serve.py --peer --budget 1800

# Regenerate the committed reference fixtures (needs torch).
fixtures: $(STAMP)
	$(BIN)/python tests/make_fixtures.py

# GPT-1: pretraining on unlabelled reviews + fine-tuning beats training on the labels alone. The IMDB
# reviews are not shipped (research use only): point IMDB at them. Resumable: rerun to continue.
IMDB ?= ../shared/data/imdb
SST2 ?= ../shared/data/sst2
# The LM shipped as weights/imdb-reviews: ~2.5 h on 2 cores; rerun to resume exactly where it stopped
imdb-model: $(STAMP)
	$(BIN)/python examples/imdb_data.py --imdb $(IMDB) --out runs/imdb
	test -f runs/imdb-data/meta.json || $(BIN)/npgpt prepare runs/imdb/pretrain.jsonl --tokenizer bpe:8192 \
	    --val-fraction 0.01 --out runs/imdb-data
	$(BIN)/npgpt train --data runs/imdb-data --out runs/imdb-reviews $$(test -f runs/imdb-reviews/state.json && echo --resume) \
	    --n_layer 6 --n_head 8 --n_embd 256 --block_size 256 --batch_size 16 --max_iters 6000 \
	    --learning_rate 1e-3 --min_lr 1e-4 --warmup_iters 200 --dropout 0.0 --weight_decay 0.1 \
	    --eval_interval 250 --eval_iters 40 --seed 1337

experiment-gpt1: $(STAMP)
	$(BIN)/python examples/imdb_data.py --imdb $(IMDB) --out runs/imdb
	$(BIN)/python examples/gpt1_imdb.py --data runs/imdb --sst2 $(SST2) --out runs/gpt1-imdb

# GPT-3: alternating dense and banded attention vs all-dense (D, BD, BBBD) on War and Peace; resumable
WARPEACE ?= ../shared/data/warpeace/warpeace_input.txt
experiment-banded: $(STAMP)
	$(BIN)/python examples/banded_attention.py --data $(WARPEACE)

# GPT-3: accuracy rises with the number of in-context demonstrations
experiment-fewshot: $(STAMP)
	$(BIN)/python examples/fewshot_icl.py

# GPT-4: predict a run's loss from runs of 1/10 and 1/100 of its compute (needs `make imdb-model`'s data);
# commit examples/scaling/*-prediction.json, then `python examples/scaling.py --corpus C --target`
experiment-scaling: $(STAMP)
	$(BIN)/python examples/scaling.py --corpus teacher
	$(BIN)/python examples/scaling.py --corpus imdb

# InstructGPT: pretrain -> SFT -> reward model -> PPO (with/without KL, with ptx) and DPO on a hidden rule
experiment-rlhf: $(STAMP)
	$(BIN)/python examples/rlhf_synthetic.py

# GPTs are GPTs: an LLM-exposure labeller fine-tuned on GPT-4's labels, cross-validated on unseen occupations,
# then shipped (weights/exposure-labeller) and scoring all 19,265 O*NET tasks. Starts from weights/imdb-reviews
# (make imdb-model, then examples/imdb_ship.py). Resumable: rerun to continue.
GPTS ?= ../shared/data/gpts-are-gpts
experiment-exposure: $(STAMP)
	$(BIN)/python examples/exposure_labeller.py --data $(GPTS) --out runs/exposure --ship

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

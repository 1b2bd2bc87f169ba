# The two set-up commands of the README:
#   make demo   download 124M, encode a text, fine-tune a few dozen steps, sample from the run
#   make test   install everything the tests need, then run the whole suite
PYTHON ?= python3
MODEL ?= 124M
DEMO_TEXT ?= ../shared/data/tinyshakespeare.txt
DEMO_STEPS ?= 30
DEMO_RUN ?= demo

TINYSHAKESPEARE_URL ?= https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

# Print the demo text's path: DEMO_TEXT if it exists, else tinyshakespeare fetched once.
define FETCH_TEXT
import pathlib, sys, requests
given, cached = map(pathlib.Path, sys.argv[1:3])
if not given.is_file() and not cached.is_file():
    print(f"{given} not found: fetching tinyshakespeare", file=sys.stderr)
    r = requests.get("$(TINYSHAKESPEARE_URL)", timeout=60)
    r.raise_for_status()
    cached.with_suffix(".part").write_bytes(r.content)
    cached.with_suffix(".part").replace(cached)
print(given if given.is_file() else cached)
endef
export FETCH_TEXT

.PHONY: install install-test demo test bench

install:
	$(PYTHON) -m pip install -q -e .

# Reference packages the tests compare against (never runtime dependencies):
# transformers on the CPU build of torch that lies on disk, gpt-2-simple without its
# stale pins, playwright driving Debian's chromium for the browser test.
install-test: install
	$(PYTHON) -m pip install -q -e '.[test]' 'torch==2.13.0' transformers
	$(PYTHON) -m pip install -q --no-deps gpt-2-simple==0.8.1 toposort
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: install
	$(PYTHON) download_model.py $(MODEL)
	mkdir -p data
	$(PYTHON) -c "$$FETCH_TEXT" '$(DEMO_TEXT)' data/tinyshakespeare.txt > data/demo_text_path
	$(PYTHON) encode.py "$$(cat data/demo_text_path)" data/demo.npz --model_name $(MODEL)
	PYTHONPATH=src $(PYTHON) train.py --dataset data/demo.npz --model_name $(MODEL) --run_name $(DEMO_RUN) --steps $(DEMO_STEPS) --sample_every 0 --save_every $(DEMO_STEPS) --restore_from latest
	$(PYTHON) generate_unconditional.py --run_name $(DEMO_RUN) --nsamples 3 --length 100 --top_k 40 --seed 1

# Two pytest workers, one test file each at a time (a file's fixtures, servers included, stay in
# one process): half the wall time on 2 cores, since many tests wait on a subprocess starting.
test: install-test
	GPT2TF_REQUIRE_SHARED=1 GPT2TF_REQUIRE_REFERENCE=1 GPT2TF_REQUIRE_BROWSER=1 \
		$(PYTHON) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench:
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_encode.py
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/bench_serve.py
	$(PYTHON) benchmarks/bench_quality.py

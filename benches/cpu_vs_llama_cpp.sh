#!/usr/bin/env bash
# tulu and llama.cpp on the same GGUF files and threads, alternating, one type after the other
# (docs/performance.md, "CPU weights"). Prints the load average before each type: figures from a
# loaded machine compare only within one run.
#
#   benches/cpu_vs_llama_cpp.sh PYTHON FILE.gguf...    (PYTHON: a venv with llama-cpp-python)
#
# ROUNDS (default 2) repeats the whole loop; CANDLE=1 adds tulu with candle-core's block matmul
# (TULU_QDOT=candle) for the GGML block types.
set -euo pipefail
py=$1
shift
tulu=${TULU:-target/release/tulu}
for round in $(seq "${ROUNDS:-2}"); do
    for model in "$@"; do
        echo "# round $round $model load $(cut -d' ' -f1 /proc/loadavg)"
        echo "tulu $("$tulu" bench --model "$model" --prompt-len 128 --gen-len 32 --repeat 2 2>/dev/null | grep generate)"
        if [[ -n "${CANDLE:-}" ]]; then
            echo "tulu-candle $(TULU_QDOT=candle "$tulu" bench --model "$model" --prompt-len 128 --gen-len 32 --repeat 2 2>/dev/null | grep generate)"
        fi
        echo "llama.cpp $("$py" benches/llama_cpp_peer.py bench "$model" --threads 2 --prompt-len 128 --gen-len 32 --repeat 2)"
    done
done

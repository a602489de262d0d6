#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same GGUF and threads as `tulu bench`.

    python benches/llama_cpp_peer.py quantize IN.gguf OUT.gguf f32|bf16|q8_0|q4_0|q4_k_m
    python benches/llama_cpp_peer.py bench MODEL.gguf [--threads 2] [--prompt-len 128] [--gen-len 64] [--repeat 3]

`quantize` re-types every tensor with llama.cpp's own quantizer (requantizing from the source
type), so both engines read the same file. `bench` times what `tulu bench` times: one prefill of a
synthetic prompt, then `gen_len - 1` single-token greedy steps; the best of `repeat` runs; one JSON
line like tulu's. llama-cpp-python builds llama.cpp from source (`pip install llama-cpp-python`
in a virtual environment outside the repository).
"""

import argparse
import json
import time

import llama_cpp
import numpy as np

FTYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def quantize(src, dst, kind):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def bench(args):
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.prompt_len + args.gen_len + 16,
        n_batch=512,
        n_ubatch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()
    # Deterministic ordinary tokens (ids past the specials), as tulu's synthetic prompt.
    prompt = [1000 + (i * 7919) % (vocab - 2000) for i in range(args.prompt_len)]
    best_prefill = best_decode = 0.0
    for _ in range(max(args.repeat, 1)):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(args.gen_len - 1):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        t2 = time.perf_counter()
        best_prefill = max(best_prefill, args.prompt_len / (t1 - t0))
        best_decode = max(best_decode, (args.gen_len - 1) / (t2 - t1))
    print(json.dumps({
        "case": "generate",
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "model": args.model,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "prefill_tok_s": round(best_prefill, 2),
        "decode_tok_s": round(best_decode, 2),
    }))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", choices=sorted(FTYPES))
    b = sub.add_parser("bench")
    b.add_argument("model")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=64)
    b.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "quantize":
        quantize(args.src, args.dst, args.kind)
    else:
        bench(args)


if __name__ == "__main__":
    main()

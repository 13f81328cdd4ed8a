"""Benchmark: the first-letter prompts of the ``probe_data`` stage, prompts per second.

The absorption metric (``saelab.structure``; SAEBench ``absorption``) needs the residual stream
at the hookpoint at the query word's token of one 10-example ICL prompt per word of the
single-token alphabetic vocabulary (47,078 words for SmolLM2's tokenizer). This script loads the
real model of params.yaml in float32 and in bfloat16 and times, per dtype, in one process:

* ``full``: the straightforward truncated forward of whole SAEBench prompts
  (``capture_batched`` on ``LetterPrompts.full_ids``, ``cache.batch_size`` prompts a batch);
* ``prefixed``: the stage's path, ``capture_prefixed``: one truncated forward per shared ICL
  prefix (``structure.words_per_prefix`` words each), then separator + word per word on a copy
  of the prefix's KV cache.

It prints prompts/s (wall and process CPU), the maximum relative difference of the two paths'
activations on the same words, and the cosine of bf16 to fp32 activations. Run:
``python bench/letter_prompts.py [--params params.yaml] [--words 1024] [--full-words 128]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saelab.capture import load_model, load_tokenizer  # noqa: E402
from saelab.config import load_params  # noqa: E402
from saelab.probes import capture_batched, capture_prefixed, letter_prompts  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--full-words", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    p = cfg.structure
    tok = load_tokenizer(cfg.model)
    prompts = letter_prompts(tok, args.words, p.icl_examples, 0.2, p.seed, p.words_per_prefix)
    rows = np.arange(args.full_words)
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads "
        f"{torch.get_num_threads()}, prompt {prompts.prompt_len} tokens, "
        f"{p.words_per_prefix} words/prefix, batch {cfg.cache.batch_size}"
    )
    acts = {}
    for dtype in ("float32", "bfloat16"):
        mcfg = cfg.model.model_copy(update={"dtype": dtype, "device": "cpu"})
        model = load_model(mcfg, torch.device("cpu"))
        full_ids = prompts.full_ids(rows)
        capture_batched(model, mcfg, full_ids[:16], 16, prompts.word_pos)  # warm-up
        slow, w1, c1 = timed(
            lambda: capture_batched(model, mcfg, full_ids, cfg.cache.batch_size, prompts.word_pos)  # noqa: B023
        )
        fast, w2, c2 = timed(lambda: capture_prefixed(model, mcfg, prompts, cfg.cache.batch_size))  # noqa: B023
        rel = np.abs(fast[rows] - slow).max() / np.abs(slow).max()
        for name, n, w, c in (("full", len(rows), w1, c1), ("prefixed", len(fast), w2, c2)):
            print(f"{dtype:8s} {name:8s} {n / w:8.1f} prompts/s wall {n / c:8.1f} per CPU-s")
        print(f"{dtype:8s} max |prefixed - full| / max |full| = {rel:.2e}")
        acts[dtype] = fast
    a, b = acts["float32"], acts["bfloat16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"bf16 vs fp32 activations: cosine min {cos.min():.5f}, mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()

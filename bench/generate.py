"""Issue 2: greedy generation and prefill speed of our decoder against transformers, on the real SmolLM2-135M.

    python bench/generate.py              # ~3 minutes on a busy 2-core machine
    python bench/generate.py --quick      # smoke run: short prompt, few tokens, one run
    python bench/generate.py --profile    # also print where each side's time goes (torch.profiler)

Both sides load the same GGUF file (`model.sources.resolve("smollm2-135m")`, Q4_1 weights dequantised) in float32
(or --dtype bfloat16) and read the same Polish prompt, tokenised once by our tokenizer. Measured, alternating ours
and theirs:

  greedy generation   new tokens / seconds of one whole call: ours `model.generate` (chunked prefill of the prompt,
                      then one token at a time through the rolling KV cache), theirs `generate(do_sample=False)`
                      with min_new_tokens = max_new_tokens, so both produce exactly the same number of tokens (the
                      two token sequences are also compared: greedy decoding must agree). Ours as `model.load`
                      gives it: linear layers holding the GGUF's Q4_1/Q8_0 blocks instead of float32 weights,
                      which decode steps read (the same weight values, float32 arithmetic; model/gguf_linear.py).
                      The row below it is ours with float32 weights alone (`bench.common.load_float_weights`), as
                      theirs runs.
  prompt lookup       the same greedy generation, speculative: up to --draft-tokens guesses copied from earlier in
                      the text, checked in one forward pass (ours `generate(..., draft_tokens=N)`, theirs
                      `generate(..., prompt_lookup_num_tokens=N, max_matching_ngram_size=3)`); the tokens must still
                      be those of plain greedy decoding
  prefill             prompt tokens / seconds of one forward over the prompt. The target row pits ours
                      `model.prefill` (what generation runs: logits of the last position only) against theirs
                      `model(tokens)` (logits of every position); the two like-for-like rows below it compare
                      last-position logits with last-position logits (their `logits_to_keep=1`) and all with all
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# `python bench/X.py` puts bench/ first on sys.path; the scripts import from the repo root instead (bench.common, ...).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (alternate, load_average, load_float_weights, load_smollm2_both, machine_summary,  # noqa: E402
                          markdown_table, median, profile_table, set_threads, verdict)

GENERATE_TARGET, PREFILL_TARGET = 2.0, 1.2


def polish_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens of the Polish test split ([BOS] + text), the same ids for both sides."""
    from data.documents import read_documents
    ids: list[int] = [tokenizer.bos_id]
    for text in read_documents("test"):
        ids += tokenizer.encode(text, bos=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the test split holds fewer than {n_tokens} tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 16-token prompt, 8 new tokens, 1 run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: on a shared machine extra threads wait on each "
                        "other and both sides slow down several-fold)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per side (default 5; --quick 1)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of each side")
    p.add_argument("--draft-tokens", type=int, default=6, help="guesses per step for the prompt-lookup rows")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and arithmetic on both sides (bfloat16: the rounding differs between the two "
                        "implementations, so the greedy tokens may part ways after a while)")
    args = p.parse_args()
    prompt_len, new_tokens, prefill_len = (16, 8, 64) if args.quick else (64, 64, 512)
    runs = args.runs or (1 if args.quick else 5)
    threads = set_threads(args.threads)

    import transformers

    from model import generate
    from model import load
    ours, tokenizer, theirs = load_smollm2_both(getattr(torch, args.dtype))
    from model.gguf_linear import GGUFLinear
    from model.sources import resolve
    ours_dense, _ = load_float_weights(resolve("smollm2-135m"), getattr(torch, args.dtype))
    n_blocks = sum(isinstance(m, GGUFLinear) for m in ours.modules())
    print(f"machine: {machine_summary(threads)}")
    print(f"{args.dtype}; transformers {transformers.__version__}, "
          f"attention '{theirs.config._attn_implementation}'; "
          f"{runs} timed runs per side, alternated, medians reported; ours keeps the GGUF blocks of {n_blocks} "
          f"linear layers\n")

    prompt = polish_prompt(tokenizer, prompt_len)
    prompt_tensor = torch.tensor([prompt])
    long_prompt = torch.tensor([polish_prompt(tokenizer, prefill_len)])

    def ours_generate() -> list[int]:
        return list(generate(ours, prompt, new_tokens))

    def ours_dense_generate() -> list[int]:
        return list(generate(ours_dense, prompt, new_tokens))

    @torch.no_grad()
    def theirs_generate() -> list[int]:
        out = theirs.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=tokenizer.eos_id)
        return out[0, len(prompt):].tolist()

    def ours_lookup() -> list[int]:
        return list(generate(ours, prompt, new_tokens, draft_tokens=args.draft_tokens))

    @torch.no_grad()
    def theirs_lookup() -> list[int]:
        out = theirs.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_id,
                              prompt_lookup_num_tokens=args.draft_tokens, max_matching_ngram_size=3)
        return out[0, len(prompt):].tolist()

    # Also the warm-up round of the generation timing: every variant must give the tokens of plain greedy decoding.
    reference = ours_generate()
    same = {name: fn() == reference for name, fn in (("theirs", theirs_generate), ("ours lookup", ours_lookup),
                                                     ("theirs lookup", theirs_lookup),
                                                     ("ours float32 weights only", ours_dense_generate))}
    decode = alternate({"ours": ours_generate, "theirs": theirs_generate, "ours lookup": ours_lookup,
                        "theirs lookup": theirs_lookup, "ours dense": ours_dense_generate}, runs, warmup=0)

    @torch.no_grad()
    def ours_prefill() -> torch.Tensor:
        return ours.prefill(long_prompt, ours.make_cache(1, max_tokens=prefill_len))

    @torch.no_grad()
    def ours_all_logits() -> torch.Tensor:
        return ours(long_prompt)

    @torch.no_grad()
    def theirs_last_logits() -> torch.Tensor:
        return theirs(long_prompt, logits_to_keep=1).logits

    @torch.no_grad()
    def theirs_all_logits() -> torch.Tensor:
        return theirs(long_prompt).logits

    prefill = alternate({"ours prefill": ours_prefill, "theirs all": theirs_all_logits,
                         "ours all": ours_all_logits, "theirs last": theirs_last_logits}, runs)

    def rate(tokens: int, seconds: list[float]) -> float:
        return tokens / median(seconds)

    rows = []

    def add(name: str, tokens: int, mine: list[float], other: list[float], target: float | None) -> None:
        a, b = rate(tokens, mine), rate(tokens, other)
        rows.append([name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x",
                     f">= {target}x" if target else "-", verdict(a / b, target) if target else "-"])

    add(f"greedy generation, {prompt_len}-token prompt + {new_tokens} new (new tok/s)", new_tokens,
        decode["ours"], decode["theirs"], GENERATE_TARGET)
    add("greedy generation, ours with the float32 weights alone (no GGUF blocks)", new_tokens,
        decode["ours dense"], decode["theirs"], None)
    # Not judged against the target: transformers has the same method one argument away (the next row), and how
    # much it gains depends on how much the text repeats itself (docs/benchmarks.md).
    add(f"greedy generation: ours with prompt lookup ({args.draft_tokens} guesses) vs theirs plain",
        new_tokens, decode["ours lookup"], decode["theirs"], None)
    add(f"greedy generation, prompt lookup ({args.draft_tokens} guesses) on both sides", new_tokens,
        decode["ours lookup"], decode["theirs lookup"], None)
    add(f"prefill {prefill_len} tokens: ours `prefill` (last logits) vs theirs `model(tokens)` (all logits)",
        prefill_len, prefill["ours prefill"], prefill["theirs all"], PREFILL_TARGET)
    add(f"prefill {prefill_len} tokens, last-position logits on both sides", prefill_len,
        prefill["ours prefill"], prefill["theirs last"], None)
    add(f"forward {prefill_len} tokens, all logits on both sides", prefill_len,
        prefill["ours all"], prefill["theirs all"], None)
    print(markdown_table(["measurement (tokens/s, median)", "ours", "transformers", "ours / theirs", "target",
                          "verdict"], rows))
    agree = ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in same.items())
    print(f"\ngreedy tokens identical to ours plain ({new_tokens} new): {agree}; "
          f"load average at the end: {load_average()}")

    if args.profile:
        for name, fn in (("ours, greedy generation", ours_generate), ("transformers, greedy generation",
                                                                      theirs_generate),
                         ("ours, prefill", ours_prefill), ("transformers, forward", theirs_all_logits)):
            print(f"\n### {name}\n{profile_table(fn)}")


if __name__ == "__main__":
    main()

"""Generate text from a model, streamed as it is produced.

    python generate.py --model smollm2-135m --prompt "Stolica Polski to" --max-new-tokens 40
    python generate.py --model path/to/checkpoint --adapter runs/lapt-cpu-smollm2/adapter --temperature 0.7 --top-p 0.9
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from model import generate, load
from training import DTYPES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint folder, .gguf file or named source")
    p.add_argument("--adapter", help="a LoRA adapter folder saved by train.py, applied on top of the model")
    p.add_argument("--prompt", default="Dzień dobry! Nazywam się", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (k >= 1; default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="keep the smallest set of tokens whose probability reaches p (0 < p <= 1; default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft-tokens", type=int, default=0,
                   help="greedy only: speculative decoding with up to N guesses per step, copied from earlier in the "
                        "text (prompt lookup); same tokens, faster on text that repeats itself")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start the prompt with BOS (--bos) or not (--no-bos); default: as the checkpoint says "
                        "(Mistral yes, SmolLM2 no)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="hold the base weights in 4-bit NF4")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1 (leave it out to keep every token), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1] (leave it out to keep every token), got {args.top_p}")
    if args.draft_tokens < 0:
        p.error(f"--draft-tokens must be >= 0, got {args.draft_tokens}")
    if args.draft_tokens and args.temperature > 0:
        p.error("--draft-tokens works with greedy decoding only (--temperature 0)")

    model, tokenizer = load(args.model, device=args.device, dtype=DTYPES[args.dtype], quantize=args.quantize)
    if args.adapter:
        from lora import load_adapter
        load_adapter(model, args.adapter)
        model.eval()
    prompt = tokenizer.encode(args.prompt, bos=args.bos)
    if not prompt:
        p.error("the prompt encodes to no token (give some text, or --bos)")
    print(args.prompt, end="", flush=True)
    # New tokens are decoded after the prompt's, never alone: SentencePiece drops the leading space of a text's
    # first piece, so "▁Jan" alone decodes to "Jan" and "Nazywam się" would run into it.
    prefix = len(tokenizer.decode(prompt))
    new: list[int] = []
    text = shown = ""
    start = time.perf_counter()
    for token in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          eos_id=tokenizer.stop_ids, seed=args.seed, draft_tokens=args.draft_tokens):
        new.append(token)
        text = tokenizer.decode(prompt + new)[prefix:]
        # A byte-level token can end inside a multi-byte character: wait for the rest before printing.
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(text[len(shown):], end="", flush=True)  # what is still held back when the last token ends mid-character
    elapsed = time.perf_counter() - start
    print(f"\n[{len(new)} tokens in {elapsed:.2f} s: {len(new) / elapsed:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()

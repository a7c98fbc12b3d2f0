"""Issue 5: perplexity evaluation speed, ours against transformers, on the real SmolLM2-135M and Polish text.

    python bench/eval_ppl.py            # ~12 k tokens at ctx 1024 / stride 512, 3 runs per side: ~10 minutes
    python bench/eval_ppl.py --quick    # smoke run: ~1 k tokens at ctx 256 / stride 128, one run
    python bench/eval_ppl.py --profile  # also print where each side's time goes (on a 2 k-token subset)

The text: whole documents of the Polish test split (`data.documents.read_documents("test")`) up to the token cap,
chosen once and handed to both sides. Both tokenise them with our tokenizer and score the same sliding windows
(`eval_ppl.windows`: inputs of ctx tokens every stride tokens, each target scored once).
  ours    eval_ppl.evaluate_perplexity(model, tokenizer, documents, ctx, stride): one window per forward on the CPU
          (its default there), the output head only over the positions a window scores
  theirs  transformers' model, one window at a time, the straightforward way: full logits [ctx, vocab],
          log_softmax, gather the targets' log-probabilities
Both are timed from the documents' text to the total negative log-likelihood, alternating ours / theirs; tokens/s
is scored tokens / median seconds. Both perplexities are printed: the two must agree to ~0.1%.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

# `python bench/X.py` puts bench/ first on sys.path; the scripts import from the repo root instead (bench.common, ...).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (alternate, load_average, load_smollm2_both, machine_summary,  # noqa: E402
                          markdown_table, median, profile_table, set_threads, verdict)
from eval_ppl import evaluate_perplexity, windows  # noqa: E402

TARGET = 1.3
AGREEMENT = 1e-3  # relative difference allowed between the two perplexities


def select_documents(tokenizer, max_tokens: int) -> list[str]:
    """Whole test documents, in order, while their scored tokens (all but the first) stay within max_tokens."""
    from data.documents import read_documents
    chosen, n_tokens = [], 0
    for text in read_documents("test"):
        n = len(tokenizer.encode(text)) - 1
        if n_tokens + n > max_tokens and chosen:
            break
        chosen.append(text)
        n_tokens += n
    return chosen


@torch.no_grad()
def reference_nll(model, tokenizer, documents: list[str], ctx: int, stride: int) -> tuple[float, int]:
    """(total NLL in nats, scored tokens) over the same windows, one forward per window with every logit."""
    nll, n_tokens = 0.0, 0
    for text in documents:
        ids = tokenizer.encode(text)
        for begin, end, first in windows(len(ids), ctx, stride):
            logits = model(torch.tensor([ids[begin:end - 1]]), use_cache=False).logits[0]      # [T, V]
            log_probs = logits.float().log_softmax(-1)
            targets = torch.tensor(ids[first:end])
            # Input position p (local p - begin) predicts token p + 1: targets first..end-1 sit at first-1..end-2.
            scored = log_probs[first - 1 - begin:end - 1 - begin]
            nll -= scored.gather(1, targets[:, None]).sum().item()
            n_tokens += len(targets)
    return nll, n_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: ~1 k tokens, ctx 256, stride 128, one run")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1, see generate.py)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on scored tokens (default 12000; --quick 1000)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per side (default 3; --quick 1)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of each side")
    a = p.parse_args()
    ctx, stride = (256, 128) if a.quick else (1024, 512)
    max_tokens = a.max_tokens or (1000 if a.quick else 12000)
    runs = a.runs or (1 if a.quick else 3)
    threads = set_threads(a.threads)

    import transformers

    ours, tokenizer, theirs = load_smollm2_both()
    documents = select_documents(tokenizer, max_tokens)
    print(f"machine: {machine_summary(threads)}")
    print(f"transformers {transformers.__version__}; {len(documents)} Polish test documents, ctx {ctx}, stride "
          f"{stride}; {runs} timed runs per side, alternated, medians reported\n", flush=True)

    results: dict[str, tuple[float, int]] = {}

    def run_ours(docs: list[str] = documents) -> None:
        r = evaluate_perplexity(ours, tokenizer, docs, ctx=ctx, stride=stride, progress=False)
        results["ours"] = (r.nll, r.tokens)

    def run_theirs(docs: list[str] = documents) -> None:
        results["theirs"] = reference_nll(theirs, tokenizer, docs, ctx, stride)

    # Warm-up on the first document only: a whole extra round would cost as much as a timed one.
    run_ours(documents[:1])
    run_theirs(documents[:1])
    seconds = alternate({"ours": run_ours, "theirs": run_theirs}, runs, warmup=0)

    (nll_ours, tokens_ours), (nll_theirs, tokens_theirs) = results["ours"], results["theirs"]
    if tokens_ours != tokens_theirs:
        raise RuntimeError(f"the two sides scored different token counts: ours {tokens_ours}, theirs "
                           f"{tokens_theirs}")
    ppl = {"ours": math.exp(nll_ours / tokens_ours), "theirs": math.exp(nll_theirs / tokens_theirs)}
    rate = {side: tokens_ours / median(seconds[side]) for side in seconds}
    ratio = rate["ours"] / rate["theirs"]
    rows = [[f"{tokens_ours} tokens, ctx {ctx}, stride {stride}", f"{rate['ours']:.1f}", f"{rate['theirs']:.1f}",
             f"{ratio:.2f}x", f">= {TARGET}x", verdict(ratio, TARGET), f"{ppl['ours']:.4f}", f"{ppl['theirs']:.4f}"]]
    print(markdown_table(["evaluation", "ours tok/s", "theirs tok/s", "ours / theirs", "target", "verdict",
                          "ours perplexity", "theirs perplexity"], rows))
    difference = abs(ppl["ours"] / ppl["theirs"] - 1)
    print(f"\nperplexities differ by {100 * difference:.4f}% ({'within' if difference <= AGREEMENT else 'OUTSIDE'} "
          f"{100 * AGREEMENT:.1f}%); seconds per run: ours {[round(s, 1) for s in seconds['ours']]}, theirs "
          f"{[round(s, 1) for s in seconds['theirs']]}; load average at the end: {load_average()}")

    if a.profile:
        subset = select_documents(tokenizer, 2000)
        print(f"\n### ours, {len(subset)} documents\n{profile_table(lambda: run_ours(subset))}")
        print(f"\n### transformers, {len(subset)} documents\n{profile_table(lambda: run_theirs(subset))}")


if __name__ == "__main__":
    main()

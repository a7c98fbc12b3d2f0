"""Perplexity as in the paper, plus bits per byte so that models with different tokenizers can be ranked.

    python eval_ppl.py --model smollm2-135m --data test
    python eval_ppl.py --model smollm2-135m --adapter runs/lapt-cpu-smollm2/adapter --model smollm2-135m --data test --json out.json

Sliding-window scoring. Each document is tokenised on its own, with BOS in front when the checkpoint's tokenizer
adds one (Mistral: yes; SmolLM2: no; --bos / --no-bos override). Its first token is never scored: with BOS that is
the BOS, without it the document's first token, which has nothing to be predicted from (transformers' strided-
perplexity recipe leaves it unscored too). Windows of `ctx` input tokens start every `stride` tokens, and each input
position predicts the token after it:

    window 0: inputs [0, ctx)                     scores targets 1 .. ctx          (what little context there is)
    window k: inputs [k*stride, k*stride + ctx)   scores only the targets window k-1 did not reach

so every token but the first is scored exactly once (`tokens` in the results counts the scored ones); once past
the first window a target has at least ctx - stride tokens of context, and no context ever crosses a document
boundary. stride == ctx gives disjoint input chunks;
stride 1 gives every target a full window of ctx tokens. In the terms of transformers' strided-perplexity recipe
(https://huggingface.co/docs/transformers/perplexity), `--ctx C --stride S` is its max_length = C + 1 and stride S:
the model reads C tokens and C targets are scored. Perplexity is exp(total NLL / scored tokens). Bits per
byte is total NLL / ln 2 / UTF-8 bytes of the text: the same text costs the same bits whatever the tokenizer, which
perplexity per token does not.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from training import DTYPES


@dataclass
class PerplexityResult:
    tokens: int            # tokens scored (every token of a document but its first)
    documents: int
    nll: float             # total negative log-likelihood, nats
    mean_nll: float
    perplexity: float
    bytes: int             # UTF-8 bytes of the scored texts
    characters: int
    bits_per_byte: float
    bits_per_character: float
    seconds: float
    tokens_per_second: float


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n tokens: (begin, end, first_target). The model reads inputs tokens[begin:end-1]
    (at most ctx) and targets first_target..end-1 are scored; together the windows score 1..n-1 exactly once."""
    if not 1 <= stride <= ctx:
        raise ValueError(f"--stride must be in 1..ctx ({ctx}), got {stride}")
    out, begin, done = [], 0, 1  # target 0 (BOS, or a first token with nothing before it) is never scored
    while done < n:
        end = min(begin + ctx + 1, n)
        out.append((begin, end, done))
        done = end
        begin += stride
    return out


@torch.no_grad()
def _score_batch(model, batch: list[list[int]], firsts: list[int], device) -> float:
    """Sum of -log p(target) over the scored targets of a batch of windows (inputs right-padded)."""
    width = max(len(w) for w in batch) - 1
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    for i, w in enumerate(batch):
        tokens[i, : len(w) - 1] = torch.tensor(w[:-1])  # the last token is only ever a target
    h = model.hidden(tokens.to(device))                               # [B, T, dim]
    # Only the scored positions go through the output head: stride rows per window instead of ctx.
    rows, targets = [], []
    for i, (w, first) in enumerate(zip(batch, firsts)):
        rows.append(h[i, first - 1: len(w) - 1])                    # position p predicts token p + 1
        targets.append(torch.tensor(w[first:], device=device))
    h, targets = torch.cat(rows), torch.cat(targets)
    # The model's own head + loss (Transformer.loss: fused and chunked once model.fast has swapped it in, plain
    # otherwise; a LoRA head's update included either way), on the scored rows alone. It returns the mean over the
    # rows; the sum is wanted.
    return model.loss(model.output, h[None], targets[None]).item() * len(targets)   # as one [1, N] "batch"


def evaluate_perplexity(model, tokenizer, texts: list[str], ctx: int = 1024, stride: int = 512,
                        batch_size: int | None = None, max_tokens: int | None = None, progress: bool = True,
                        desc: str = "perplexity", distributed: bool = False, bos: bool | None = None
                        ) -> PerplexityResult:
    """Score `texts` (documents) with `model`; see the module docstring for the windows.

    bos: put BOS before each document (None: as the tokenizer's checkpoint says, `tokenizer.add_bos`).
    batch_size: windows per forward pass; default 1 on the CPU (batching gains nothing there and pads windows of
    unequal length), 8 on a GPU.
    distributed: every process of the torch.distributed group calls this with the same texts; each scores every
    world-th window and the summed NLL is all-reduced, so all ranks return the same result (train.py under torchrun).
    """
    if not texts:
        raise ValueError("no documents to evaluate")
    device = next(model.parameters()).device
    batch_size = batch_size or (8 if device.type == "cuda" else 1)
    was_training = model.training
    model.eval()
    jobs, n_tokens, n_bytes, n_chars, n_docs = [], 0, 0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text, bos=bos, eos=False)
        if bos and (tokenizer.bos_id is None or ids[:1] != [tokenizer.bos_id]):
            raise ValueError("BOS asked for, but the tokenizer has no BOS token")
        if len(ids) < 2:  # nothing to score after the first token
            continue
        if max_tokens is not None and n_tokens + len(ids) - 1 > max_tokens and n_docs:
            break  # whole documents only, so that bytes and tokens describe the same text
        n_tokens += len(ids) - 1
        n_bytes += len(text.encode("utf-8"))
        n_chars += len(text)
        n_docs += 1
        jobs += [(ids[b:e], first - b) for b, e, first in windows(len(ids), ctx, stride)]
    if not n_tokens:
        raise ValueError("the documents hold no token to score")
    jobs.sort(key=lambda j: len(j[0]))  # similar lengths together: less padding
    rank, world = _process_group() if distributed else (0, 1)
    jobs = jobs[rank::world]
    nll, start = 0.0, time.perf_counter()
    bar = tqdm(total=sum(len(w) - f for w, f in jobs), desc=desc, unit="tok", disable=not progress, leave=False)
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        nll += _score_batch(model, [w for w, _ in batch], [f for _, f in batch], device)
        bar.update(sum(len(w) - f for w, f in batch))
    bar.close()
    if world > 1:
        total = torch.tensor(nll, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        nll = total.item()
    model.train(was_training)
    seconds = time.perf_counter() - start
    mean = nll / n_tokens
    return PerplexityResult(tokens=n_tokens, documents=n_docs, nll=nll, mean_nll=mean, perplexity=math.exp(mean),
                            bytes=n_bytes, characters=n_chars, bits_per_byte=nll / math.log(2) / n_bytes,
                            bits_per_character=nll / math.log(2) / n_chars, seconds=seconds,
                            tokens_per_second=n_tokens / seconds)


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def format_table(rows: list[tuple[str, PerplexityResult]]) -> str:
    head = f"{'model':<48} {'scored':>9} {'mean NLL':>9} {'ppl':>9} {'bits/byte':>9} {'bits/char':>9} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        lines.append(f"{name[-48:]:<48} {r.tokens:>9} {r.mean_nll:>9.4f} {r.perplexity:>9.3f} "
                     f"{r.bits_per_byte:>9.4f} {r.bits_per_character:>9.4f} {r.tokens_per_second:>8.1f}")
    return "\n".join(lines)


class _ModelAction(argparse.Action):
    """--model M [--adapter A] ... : each --adapter belongs to the --model before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "models", None) or []
        if option_string == "--model":
            models.append([value, None])
        elif not models:
            parser.error("--adapter must follow the --model it applies to")
        elif models[-1][1] is not None:
            parser.error(f"--model {models[-1][0]} already has an adapter")
        else:
            models[-1][1] = value
        namespace.models = models


def main(argv: list[str] | None = None) -> list[tuple[str, PerplexityResult]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action=_ModelAction, dest="models", metavar="M", required=True,
                   help="checkpoint folder, .gguf or named source; repeat to compare models side by side")
    p.add_argument("--adapter", action=_ModelAction, dest="models", metavar="A",
                   help="LoRA adapter folder for the --model before it")
    p.add_argument("--data", nargs="+", default=["test"],
                   help="split of the Polish corpus (train, validation, test) or .txt/.jsonl files or folders, "
                        "optionally compressed (.gz, .xz, .zst)")
    p.add_argument("--ctx", type=int, default=1024, help="window length in tokens")
    p.add_argument("--stride", type=int, default=512,
                   help="window advance; the first window scores all its targets, each later one only the last "
                        "<= stride that no earlier window scored")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after about this many scored tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="hold the base weights in 4-bit NF4")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put BOS before each document (--bos) or not (--no-bos); default: as the checkpoint says. "
                        "Either way a document's first token is not scored (without BOS nothing precedes it, as "
                        "in transformers' strided-perplexity recipe); `tokens` counts the scored tokens")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="the figures as JSON (perplexity, tokens scored, bits per byte...): to FILE, or to stdout "
                        "instead of the table when no FILE is given")
    args = p.parse_args(argv)

    from data.documents import read_documents
    from model import load
    texts = [t for spec in args.data for t in read_documents(spec)]
    rows = []
    for name, adapter in args.models:
        model, tokenizer = load(name, device=args.device, dtype=DTYPES[args.dtype], quantize=args.quantize)
        label = str(name)
        if adapter:
            from lora import load_adapter
            load_adapter(model, adapter)
            label += f" + {adapter}"
        rows.append((label, evaluate_perplexity(model, tokenizer, texts, args.ctx, args.stride, args.batch_size,
                                                args.max_tokens, desc=label[-30:], bos=args.bos)))
        del model
    payload = {"ctx": args.ctx, "stride": args.stride, "data": args.data, "bos": args.bos,
               "results": [{"model": n, **asdict(r)} for n, r in rows]}
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(rows))
    if args.json and args.json != "-":
        path = Path(args.json)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(path)
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval_ppl.py: error: {e}")

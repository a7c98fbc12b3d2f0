"""Language-adaptive pre-training (LAPT): freeze an English model, train LoRA adapters on Polish text.

    python train.py                      # SmolLM2-135M on the Polish corpus, on the CPU (minutes: README)
    python train.py --preset curie --model path/to/mistral-7b      # the paper's recipe, on a GPU
    torchrun --nproc_per_node=2 train.py ...                        # data-parallel (DDP)

The loop, in the order the code runs it:
  1. load the base model, freeze it, inject LoRA adapters (only they train);
  2. pack the tokenised corpus into blocks of seq_len + 1 tokens (EOS after each document, BOS before each when
     the checkpoint's tokenizer adds one);
  3. measure held-out Polish perplexity of the base model (eval_ppl.evaluate_perplexity);
  4. AdamW on the adapters: micro-batches, gradient accumulation, clipping, warm-up + decay, bf16 autocast where
     the device has native bf16 (--autocast auto), activation checkpointing and NEFTune noise; atomic checkpoints
     every --save-interval steps;
  5. measure perplexity again, save the adapter (and optionally a peft adapter and a merged checkpoint).

A run killed at any moment and restarted with --resume continues from its last checkpoint and reproduces the
losses an uninterrupted run would have logged: the data order depends only on (seed, step), and the checkpoint holds
the adapters, the optimiser, the scheduler, the loss scaler (float16) and every RNG, and the run's settings, which a
resume must repeat. A step whose gradients are not finite stops the run before it touches the adapters. (Under
float16 loss scaling an overflow is expected now and then: such a step is skipped and the scale halved, and the run
stops only when the gradients are not finite even at a scale below 1.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import training
from eval_ppl import evaluate_perplexity

from training import DTYPES

# The paper's recipe (Curie-7B-v1, section 3): LoRA r 32 / alpha 64 / dropout 0.05 on every projection and the head,
# sequence length 256, AdamW at 2.5e-5 after 200 warm-up steps, bf16, gradient checkpointing, NEFTune alpha 2.
PRESETS = {
    "cpu-smollm2": dict(model="smollm2-135m", seq_len=256, micro_batch=4, grad_accum=2, lr=2e-3, warmup=10,
                        schedule="cosine", steps=60, lora_r=32, lora_alpha=64, lora_dropout=0.05,
                        eval_max_tokens=12000, eval_ctx=512, eval_stride=256, eval_interval=0, save_interval=10,
                        dtype="float32", autocast="auto", grad_checkpointing=False, neftune_alpha=0.0,
                        quantize=None),
    "curie": dict(seq_len=256, micro_batch=8, grad_accum=4, lr=2.5e-5, warmup=200, schedule="cosine",
                  steps=None, tokens=276_000_000, lora_r=32, lora_alpha=64, lora_dropout=0.05,
                  eval_max_tokens=200_000, eval_ctx=1024, eval_stride=512, eval_interval=500, save_interval=500,
                  dtype="bfloat16", autocast="auto", grad_checkpointing=True, neftune_alpha=2.0,
                  quantize="nf4"),
}
CURIE_TARGETS = "wq,wk,wv,wo,w1,w2,w3,output"
# What a run leaves in its folder that another run must not silently take over or delete (a merged 7B export is
# ~14 GB): without --resume or --overwrite, train.py refuses a folder holding any of them.
RUN_OUTPUTS = ("checkpoint.pt", "adapter", "adapter-peft", "merged", "summary.json")

# The settings that decide a run's numbers: its model, data order, schedule, adapters, precision and perplexity
# windows. A checkpoint records them, and --resume refuses to continue with any of them changed: that would not be
# the interrupted run resumed but another one grafted onto it. (Intervals, device and exports may change.)
RUN_SETTINGS = ("model", "data", "eval_data", "seq_len", "micro_batch", "grad_accum", "lr", "schedule", "warmup",
                "min_lr_factor", "steps", "tokens", "weight_decay", "grad_clip", "lora_r", "lora_alpha",
                "lora_dropout", "lora_targets", "rslora", "seed", "dtype", "autocast", "quantize", "neftune_alpha",
                "eval_max_tokens", "eval_ctx", "eval_stride", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="cpu-smollm2",
      help="a named set of defaults (any flag below overrides it): cpu-smollm2 (default) or curie (the paper)")
    a("--model", help="checkpoint folder, .gguf file or named source (cpu-smollm2: smollm2-135m)")
    a("--data", help="training text: 'train' (the Polish corpus built from Debian packages), or a .txt/.jsonl file "
                     "or a folder of them, optionally compressed (.gz, .xz, or .zst as SpeakLeash's .jsonl.zst; "
                     ".zst needs the zstandard package); read streamed")
    a("--eval-data", help="held-out text for the before/after perplexity (default: 'test')")
    a("--seq-len", type=int, help="tokens per training block (the paper: 256)")
    a("--micro-batch", type=int, help="blocks per forward pass")
    a("--grad-accum", type=int, help="micro-batches accumulated per optimiser step")
    a("--lr", type=float, help="peak learning rate of AdamW")
    a("--schedule", choices=training.SCHEDULES, help="learning-rate decay after warm-up")
    a("--warmup", type=int, help="linear warm-up steps")
    a("--min-lr-factor", type=float, default=0.1, help="the decay ends at this fraction of --lr")
    a("--steps", type=int, help="optimiser steps (overrides --tokens)")
    a("--tokens", type=int, help="token budget; steps = tokens / (seq_len * global batch)")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    a("--lora-r", type=int, help="LoRA rank")
    a("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r)")
    a("--lora-dropout", type=float, help="dropout on the LoRA path")
    a("--lora-targets", default=CURIE_TARGETS, help="comma-separated modules to adapt (ours or peft's names)")
    a("--rslora", action="store_true", help="scale alpha / sqrt(r) instead of alpha / r")
    a("--eval-interval", type=int,
      help="loss on a fixed batch of validation blocks every N steps and at the last step (0: never)")
    a("--eval-max-tokens", type=int, help="cap on tokens scored for the before/after perplexity")
    a("--eval-ctx", type=int, help="perplexity window length (see eval_ppl.py)")
    a("--eval-stride", type=int, help="perplexity window advance")
    a("--save-interval", type=int, help="checkpoint every N steps")
    a("--seed", type=int, default=1234)
    a("--out", type=Path, default=None, help="run folder (default runs/lapt-<preset>)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--overwrite", action="store_true",
      help="start afresh even if --out holds a run (its checkpoint, adapters and logs are deleted first)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", choices=DTYPES, help="dtype of the frozen base weights")
    a("--autocast", choices=training.AUTOCAST_CHOICES,
      help="mixed precision for the forward pass. auto (the presets' default): bfloat16 where the device multiplies "
           "bf16 natively (a CUDA GPU with bf16, a CPU with avx512_bf16 or amx_bf16), else none; elsewhere bf16 "
           "products are emulated and slower than float32. float16 adds dynamic loss scaling; none: the base's "
           "dtype. The resolved choice is printed at start-up and recorded in the run's settings")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward")
    a("--neftune-alpha", type=float, help="NEFTune embedding noise (0: off; the paper: 2)")
    a("--quantize", choices=["nf4"], help="hold the base in 4-bit NF4 (QLoRA)")
    a("--fsdp", action="store_true", help="with torchrun: shard the model with FSDP2 (fully_shard) instead of DDP")
    a("--export-peft", action="store_true", help="also write the adapter in peft's layout")
    a("--export-merged", action="store_true", help="also write the merged model as a Hugging Face checkpoint")
    a("--no-eval", action="store_true", help="skip the before/after perplexity (tests, quick runs)")
    a("--max-steps-this-run", type=int, help="stop after this many steps (to test resuming)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if key == "steps" and args.tokens is not None:
            continue  # a token budget given on the command line wins over the preset's step count
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None:
        p.error("--model is required with --preset curie (a Mistral-7B checkpoint folder)")
    args.data = args.data or "train"
    args.eval_data = args.eval_data or "test"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.autocast = training.resolve_autocast(args.autocast, args.device)  # "bfloat16", "float16" or None
    args.out = args.out or Path("runs") / f"lapt-{args.preset}"
    return args


# ------------------------------------------------------------------------------------------------------- data

class PackedBlocks:
    """The token stream cut into consecutive blocks of seq_len + 1 tokens (inputs and shifted targets overlap by
    one), visited in a seeded random order that is a pure function of (seed, sample index): resuming at step s
    needs nothing but s."""

    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks < 1:
            raise ValueError(f"the training data holds {len(tokens)} tokens, fewer than one block of {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    def block(self, sample: int) -> torch.Tensor:
        epoch, i = divmod(sample, self.n_blocks)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_blocks, generator=g), epoch
        b = int(self._perm[i]) * self.seq_len
        return torch.from_numpy(self.tokens[b: b + self.seq_len + 1].astype("int64"))

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        return torch.stack([self.block(first_sample + k) for k in range(size)])


# ------------------------------------------------------------------------------------------------------- the loop

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = training.setup_distributed(args.device)
    run = Run(args, rank, world, device)
    ckpt = open_run_folder(run)  # refuses to take over another run's folder; the checkpoint to --resume, if any
    training.set_seed(args.seed)
    run.say(f"loading {args.model} on {device} ({args.dtype}; autocast: {args.autocast or 'none'})")
    model, tokenizer, lora_cfg, summary = build_model(args, device)
    run.say(summary)
    blocks, eval_texts, val_batch = read_data(run, tokenizer)

    steps = total_steps(args, world)
    global_batch = args.micro_batch * args.grad_accum * world
    train_model = training.wrap_distributed(model, args.fsdp, world, device)  # FSDP swaps in sharded parameters: first
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scheduler = training.make_scheduler(optimizer, args.schedule, args.warmup, steps, args.min_lr_factor)
    scaler = training.loss_scaler(device, args.autocast)  # float16 only; a no-op otherwise
    start_step, before = resume(run, ckpt, train_model, model, optimizer, scheduler, scaler) if ckpt else (0, None)
    ckpt = None  # its copies of the adapters and the optimiser state are in place now
    metrics = training.MetricsLog(args.out / "metrics.jsonl", resume_step=start_step if args.resume else None) \
        if run.main else None
    if eval_texts is not None and before is None:
        before = perplexity(run, model, tokenizer, eval_texts, "base perplexity").__dict__
        run.say(f"base model: {args.eval_data} perplexity {before['perplexity']:.3f} ({before['tokens']} tokens, "
                f"{before['bits_per_byte']:.4f} bits/byte)")

    autocast = training.autocast_context(device, args.autocast)
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc="LAPT", unit="step", disable=not run.main)
    t0, tokens_done = time.perf_counter(), 0
    stop_at = steps if args.max_steps_this_run is None else min(steps, start_step + args.max_steps_this_run)
    for step in range(start_step, stop_at):
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            first = step * global_batch + (micro * world + rank) * args.micro_batch
            batch = blocks.batch(first, args.micro_batch).to(device)
            with training.gradient_sync(train_model, micro == args.grad_accum - 1, world, args.fsdp), autocast:
                # The fused head + loss (Transformer.forward with targets): no [micro_batch, seq_len, vocab] logits.
                loss = train_model(batch[:, :-1], targets=batch[:, 1:])
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        loss_value = training.mean_over_ranks(loss_sum, world).item()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        grad_norm, scale = training.optimizer_step(optimizer, scaler, trainable, args.grad_clip, step + 1, loss_value,
                                                   run.checkpoint)
        scheduler.step()
        tokens_done += global_batch * args.seq_len
        rate = tokens_done / (time.perf_counter() - t0)
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens": (step + 1) * global_batch * args.seq_len, "tokens_per_s": rate}
        if scale is not None:
            record["loss_scale"], record["skipped"] = scale, not math.isfinite(grad_norm)
        if val_batch is not None and ((step + 1) % args.eval_interval == 0 or step + 1 == steps):
            record["eval_loss"] = validation_loss(model, val_batch.to(device), autocast)
        if run.main:
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
        if (step + 1) % args.save_interval == 0 or step + 1 in (steps, stop_at):
            save_checkpoint(run, step + 1, model, optimizer, scheduler, scaler, before, metrics)
    bar.close()
    if stop_at < steps:
        run.say(f"stopped after step {stop_at} as asked; continue with --resume")
        return {"stopped_at": stop_at}
    return finish(run, model, tokenizer, lora_cfg, optimizer, eval_texts, metrics,
                  {"model": str(args.model), "steps": steps, "tokens": steps * global_batch * args.seq_len,
                   "lora": summary, "before": before})


# ------------------------------------------------------------------------------------------------------- its helpers

@dataclass
class Run:
    """This process's place in the run: its flags, its rank among the torchrun processes, its device."""
    args: argparse.Namespace
    rank: int
    world: int
    device: str

    @property
    def main(self) -> bool:  # rank 0 writes the run folder and prints
        return self.rank == 0

    @property
    def sharded(self) -> bool:  # FSDP: no process holds whole weights
        return self.args.fsdp and self.world > 1

    @property
    def checkpoint(self) -> Path:
        return self.args.out / "checkpoint.pt"

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k)


def open_run_folder(run: Run) -> dict | None:
    """Check that --out may be written (it holds no other run, or --resume / --overwrite says what to do with it),
    clear it for a fresh run, write config.json; -> the checkpoint to resume (its settings checked), or None."""
    args, out = run.args, run.args.out
    earlier = ", ".join(name for name in RUN_OUTPUTS if (out / name).exists())
    if earlier and not (args.resume or args.overwrite):
        sys.exit(f"train.py: error: {out} already holds a run ({earlier}); pass --resume to continue it, "
                 f"--overwrite to start afresh, or another --out")
    if args.resume and not run.checkpoint.exists():
        if earlier and not args.overwrite:
            sys.exit(f"train.py: error: {out} holds no checkpoint to --resume, but another run's {earlier}; pass "
                     f"--overwrite to replace them, or another --out")
        run.say(f"no checkpoint in {out}: starting afresh")
        args.resume = False
    ckpt = None
    if args.resume:  # before minutes of loading: a run resumed with other settings is refused here
        ckpt = training.read_checkpoint(run.checkpoint)
        check_same_run(run.checkpoint, ckpt["extra"].get("settings"), run_settings(args, run.world))
    if args.autocast == "float16" and run.sharded:
        raise ValueError("--autocast float16 with --fsdp: the loss scaler here is not shard-aware; use bfloat16")
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:  # nothing of the old run may survive to be taken for this one's
            for name in RUN_OUTPUTS:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink(missing_ok=True)
        if not args.resume:
            for stale in ("metrics.jsonl", "loss.svg"):
                (out / stale).unlink(missing_ok=True)
        run_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        training.atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
    return ckpt


def build_model(args, device: str):
    from lora import LoRAConfig, inject_lora, parameter_summary
    from model import load
    model, tokenizer = load(args.model, device=device, dtype=DTYPES[args.dtype], quantize=args.quantize)
    cfg = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                     rslora=args.rslora)
    inject_lora(model, cfg)
    # LoRA weights train in float32 even over a bf16 base: Adam's updates are far below bf16's resolution.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing = bool(args.grad_checkpointing)
    if args.neftune_alpha:
        model.tok_embeddings.register_forward_hook(training.neftune_hook(args.neftune_alpha))
    return model, tokenizer, cfg, parameter_summary(model)


def read_data(run: Run, tokenizer) -> tuple[PackedBlocks, list[str] | None, torch.Tensor | None]:
    """-> (the training blocks, the held-out documents of the before/after perplexity, the validation batch); the
    last two None when not asked for."""
    from data.documents import read_documents
    from data.tokens import cached_token_file, load_tokens
    args = run.args
    run.say(f"tokenising training data ({args.data})")
    tokenizer_key = _tokenizer_key(args.model, tokenizer)
    if run.sharded and not args.no_eval:
        run.say("with --fsdp no process holds whole weights: evaluate the adapter afterwards with eval_ppl.py")

    def read():  # may build the corpus and token files: rank 0 first, the others then read them
        return (cached_token_file(args.data, tokenizer, tokenizer_key),
                None if args.no_eval or run.sharded else read_documents(args.eval_data),
                _validation_batch(args, tokenizer, tokenizer_key) if args.eval_interval else None)
    token_path, eval_texts, val_batch = training.on_rank_0_first(read, run.rank, run.world)
    return PackedBlocks(load_tokens(token_path), args.seq_len, args.seed), eval_texts, val_batch


def total_steps(args, world: int) -> int:
    if args.steps:
        return args.steps
    per_step = args.seq_len * args.micro_batch * args.grad_accum * world
    return max(1, math.ceil(args.tokens / per_step))


def resume(run: Run, ckpt: dict, train_model, model, optimizer, scheduler, scaler) -> tuple[int, dict | None]:
    """Put the checkpoint's adapters, optimiser, scheduler, loss scale and RNGs in place; -> (its step, the base
    model's perplexity it measured)."""
    if run.sharded:
        training.load_sharded_checkpoint(ckpt, train_model, optimizer, scheduler)
    else:
        training.load_checkpoint(run.checkpoint, model, optimizer, scheduler, ckpt=ckpt)
    if ckpt["extra"].get("scaler"):
        scaler.load_state_dict(ckpt["extra"]["scaler"])
    # The checkpoint's "rng" is rank 0's. On CPU every rank's generator is in the same state anyway; on CUDA rank
    # k draws from device k's generator, which only rank k's process has advanced: each rank takes its own.
    if ckpt["extra"].get("rng_per_rank"):
        training.set_rng_state(ckpt["extra"]["rng_per_rank"][run.rank])
    run.say(f"resumed {run.args.out} at step {ckpt['step']}/{total_steps(run.args, run.world)}")
    return ckpt["step"], ckpt["extra"].get("before")


def save_checkpoint(run: Run, step: int, model, optimizer, scheduler, scaler, before, metrics) -> None:
    """Every rank calls this (FSDP gathers whole tensors, and each rank's RNG state is collected); rank 0 writes the
    checkpoint, atomically, and redraws the loss picture."""
    full = training.gather_full_state(model, optimizer) if run.sharded else {}
    rngs = training.gather_rng_states() if run.world > 1 else None  # each rank's dropout/noise stream
    if run.main:
        training.save_checkpoint(run.checkpoint, model, optimizer, scheduler, step, {"step": step},
                                 extra={"before": before, "rng_per_rank": rngs,
                                        "settings": run_settings(run.args, run.world),
                                        "scaler": scaler.state_dict() if scaler.is_enabled() else None}, **full)
        training.loss_curve_svg(metrics.records, run.args.out / "loss.svg", f"LAPT of {run.args.model}")


def perplexity(run: Run, model, tokenizer, texts: list[str], desc: str):
    """Held-out perplexity; every rank scores its share of the windows (distributed), so none idles at a collective
    meanwhile."""
    args = run.args
    return evaluate_perplexity(model, tokenizer, texts, ctx=args.eval_ctx, stride=args.eval_stride,
                               max_tokens=args.eval_max_tokens, distributed=run.world > 1, progress=run.main,
                               desc=desc)


def finish(run: Run, model, tokenizer, lora_cfg, optimizer, eval_texts, metrics, result: dict) -> dict:
    """The adapted model's perplexity, the adapter (and the exports asked for), the loss picture and summary.json."""
    args, out, before = run.args, run.args.out, result["before"]
    full = training.gather_full_state(model, optimizer) if run.sharded else {}
    # Evaluate first, on every rank, then save and export on rank 0 alone: no rank then waits at a collective while
    # another writes files (the adapter is already safe in the last checkpoint).
    after = perplexity(run, model, tokenizer, eval_texts, "adapted perplexity") if eval_texts is not None else None
    if run.main:
        model.eval()
        from lora import export_merged_hf, save_adapter, save_peft_adapter
        save_adapter(model, lora_cfg, out / "adapter", tensors=full.get("trainable"))
        if run.sharded and (args.export_peft or args.export_merged):  # these read whole weights off the model
            run.say("with --fsdp, export from the saved adapter: load the base, lora.load_adapter, then export")
            args.export_peft = args.export_merged = False
        if args.export_peft:
            save_peft_adapter(model, lora_cfg, out / "adapter-peft")
        if args.export_merged:
            export_merged_hf(model, model.args, out / "merged")
        if after is not None:
            result["after"] = after.__dict__
            drop = 1 - after.perplexity / before["perplexity"]
            result["perplexity_drop"] = drop
            run.say(f"\n{args.eval_data} perplexity: base {before['perplexity']:.3f} -> adapted "
                    f"{after.perplexity:.3f} ({drop:.1%} lower); bits/byte {before['bits_per_byte']:.4f} -> "
                    f"{after.bits_per_byte:.4f}")
        training.loss_curve_svg(metrics.records, out / "loss.svg", f"LAPT of {args.model}")
        training.atomic_write_text(out / "summary.json", json.dumps(result, indent=2))
        run.say(f"run folder: {out} (adapter/, metrics.jsonl, loss.svg, summary.json)")
    if run.world > 1:
        dist.destroy_process_group()
    return result


def run_settings(args, world: int) -> dict:
    """The RUN_SETTINGS of this command, and the number of processes (it sets the global batch)."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in RUN_SETTINGS}
    return {**settings, "processes": world}


def check_same_run(path: Path, stored: dict | None, current: dict) -> None:
    """Refuse to resume the checkpoint at `path` with settings other than those it was written with."""
    if stored is None:  # written before checkpoints recorded their settings: nothing to compare
        return
    changed = [k for k in current if stored.get(k) != current[k]]
    if changed:
        def flag(k: str) -> str:
            return "the number of processes" if k == "processes" else "--" + k.replace("_", "-")
        diff = "; ".join(f"{flag(k)} was {stored.get(k)!r}, now {current[k]!r}" for k in changed)
        raise ValueError(f"{path}: --resume continues the run this checkpoint is from, with its settings: {diff}. "
                         f"Give the run's own flags (its config.json lists them), or start another --out")


def _tokenizer_key(model_name, tokenizer) -> str:
    """Names the token files' cache folder. Two checkpoints in folders of the same name (…/llama2/hf, …/mistral/hf)
    with 32000-token SentencePiece vocabularies must not share token files, so the key ends in a fingerprint of the
    tokenizer itself: every id's text and the ids of a probe sentence (which the merges or pieces decide)."""
    h = hashlib.sha256(f"{type(tokenizer).__name__} {tokenizer.vocab_size} {tokenizer.bos_id} {tokenizer.eos_id}"
                       f"{' bos' if tokenizer.add_bos else ''}".encode())
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
    h.update(str(tokenizer.encode(_PROBE, bos=False)).encode())
    return f"{Path(str(model_name)).stem}-{type(tokenizer).__name__}-{tokenizer.vocab_size}-{h.hexdigest()[:12]}"


_PROBE = "Zażółć gęślą jaźń, 1234 razy!\n\tThe quick brown fox 🦊 jumps over the lazy dog."


def _validation_batch(args, tokenizer, tokenizer_key: str) -> torch.Tensor:
    """A fixed handful of validation blocks: a cheap, noise-free loss to watch during training."""
    from data.tokens import cached_token_file, load_tokens
    path = cached_token_file("validation" if args.data == "train" else args.eval_data, tokenizer,
                             tokenizer_key=tokenizer_key)
    val = PackedBlocks(load_tokens(path), args.seq_len, seed=0)
    return val.batch(0, min(8, val.n_blocks))


@torch.no_grad()
def validation_loss(model, batch, autocast) -> float:
    model.eval()
    with autocast:
        loss = model(batch[:, :-1], targets=batch[:, 1:])
    model.train()
    return loss.item()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, training.NonFiniteLoss) as e:
        sys.exit(f"train.py: error: {e}")

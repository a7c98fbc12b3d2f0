"""Language-adaptive pre-training (LAPT): freeze an English model, train LoRA adapters on Polish text.

    python train.py                      # SmolLM2-135M on the Polish corpus, on the CPU, 5-10 minutes
    python train.py --preset curie --model path/to/mistral-7b      # the paper's recipe, on a GPU
    torchrun --nproc_per_node=2 train.py ...                        # data-parallel (DDP)

The loop, in the order the code runs it:
  1. load the base model, freeze it, inject LoRA adapters (only they train);
  2. pack the tokenised corpus into blocks of seq_len + 1 tokens (EOS after each document, BOS before each when
     the checkpoint's tokenizer adds one);
  3. measure held-out Polish perplexity of the base model (eval_ppl.evaluate_perplexity);
  4. AdamW on the adapters: micro-batches, gradient accumulation, clipping, warm-up + decay, optional bf16
     autocast, activation checkpointing and NEFTune noise; atomic checkpoints every --save-interval steps;
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
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import training
from eval_ppl import evaluate_perplexity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The paper's recipe (Curie-7B-v1, section 3): LoRA r 32 / alpha 64 / dropout 0.05 on every projection and the head,
# sequence length 256, AdamW at 2.5e-5 after 200 warm-up steps, bf16, gradient checkpointing, NEFTune alpha 2.
PRESETS = {
    "cpu-smollm2": dict(model="smollm2-135m", seq_len=256, micro_batch=4, grad_accum=2, lr=2e-3, warmup=10,
                        schedule="cosine", steps=60, lora_r=32, lora_alpha=64, lora_dropout=0.05,
                        eval_max_tokens=12000, eval_ctx=512, eval_stride=256, eval_interval=0, save_interval=10,
                        # bf16 autocast: this CPU's AVX-512 bf16 doubles the matmul throughput (docs/benchmarks.md)
                        dtype="float32", autocast="bfloat16", grad_checkpointing=False, neftune_alpha=0.0,
                        quantize=None),
    "curie": dict(seq_len=256, micro_batch=8, grad_accum=4, lr=2.5e-5, warmup=200, schedule="cosine",
                  steps=None, tokens=276_000_000, lora_r=32, lora_alpha=64, lora_dropout=0.05,
                  eval_max_tokens=200_000, eval_ctx=1024, eval_stride=512, eval_interval=500, save_interval=500,
                  dtype="bfloat16", autocast="bfloat16", grad_checkpointing=True, neftune_alpha=2.0,
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
    a("--autocast", choices=["bfloat16", "float16", "none"],
      help="mixed precision for the forward pass (float16 adds dynamic loss scaling; none: the base's dtype, e.g. "
           "on a CPU without AVX-512, where bf16 products are slower than float32)")
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
    if args.autocast == "none":
        args.autocast = None
    args.data = args.data or "train"
    args.eval_data = args.eval_data or "test"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


# ------------------------------------------------------------------------------------------------------- set-up

def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) — torchrun sets WORLD_SIZE; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def build_model(args, device: str):
    from lora import LoRAConfig, inject_lora, parameter_summary
    from model import load
    model, tokenizer = load(args.model, device=device, dtype=DTYPES[args.dtype], quantize=args.quantize,
                            gguf_blocks=False)   # training multiplies many rows at once: no use for them
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


def wrap_distributed(model, args, world: int, device: str):
    if world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def total_steps(args, world: int) -> int:
    if args.steps:
        return args.steps
    per_step = args.seq_len * args.micro_batch * args.grad_accum * world
    return max(1, math.ceil(args.tokens / per_step))


# ------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    out: Path = args.out
    ckpt_path = out / "checkpoint.pt"
    earlier = ", ".join(name for name in RUN_OUTPUTS if (out / name).exists())
    if earlier and not (args.resume or args.overwrite):
        sys.exit(f"train.py: error: {out} already holds a run ({earlier}); pass --resume to continue it, "
                 f"--overwrite to start afresh, or another --out")
    if args.resume and not ckpt_path.exists():
        if earlier and not args.overwrite:
            sys.exit(f"train.py: error: {out} holds no checkpoint to --resume, but another run's {earlier}; pass "
                     f"--overwrite to replace them, or another --out")
        say(f"no checkpoint in {out}: starting afresh")
        args.resume = False
    settings = run_settings(args, world)
    ckpt = None
    if args.resume:  # before minutes of loading: a run resumed with other settings is refused here
        ckpt = training.read_checkpoint(ckpt_path)
        check_same_run(ckpt_path, ckpt["extra"].get("settings"), settings)
    if args.autocast == "float16" and args.fsdp and world > 1:
        raise ValueError("--autocast float16 with --fsdp: the loss scaler here is not shard-aware; use bfloat16")
    if main_process:
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

    training.set_seed(args.seed)
    say(f"loading {args.model} on {device} ({args.dtype})")
    model, tokenizer, lora_cfg, summary = build_model(args, device)
    say(summary)

    from data.documents import read_documents
    from data.tokens import cached_token_file, load_tokens
    say(f"tokenising training data ({args.data})")
    tokenizer_key = _tokenizer_key(args.model, tokenizer)
    sharded = args.fsdp and world > 1
    if sharded and not args.no_eval:
        say("with --fsdp no process holds whole weights: evaluate the adapter afterwards with eval_ppl.py")

    def read_data():  # may build the corpus and token files: rank 0 first, the others then read them
        return (cached_token_file(args.data, tokenizer, tokenizer_key),
                None if args.no_eval or sharded else read_documents(args.eval_data),
                _validation_batch(args, tokenizer, tokenizer_key) if args.eval_interval else None)
    token_path, eval_texts, val_batch = _on_rank_0_first(read_data, rank, world)
    blocks = PackedBlocks(load_tokens(token_path), args.seq_len, args.seed)

    steps = total_steps(args, world)
    global_batch = args.micro_batch * args.grad_accum * world
    train_model = wrap_distributed(model, args, world, device)  # FSDP swaps in sharded parameters: do it first
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scheduler = training.make_scheduler(optimizer, args.schedule, args.warmup, steps, args.min_lr_factor)
    # float16 has 5 exponent bits: small gradients underflow to zero and large ones overflow. Dynamic loss scaling
    # multiplies the loss before the backward and divides the gradients after it, skipping a step whose gradients
    # overflowed (and halving the scale). bfloat16 has float32's range and needs none: the scaler is then a no-op.
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=args.autocast == "float16")

    start_step, before = 0, None
    if args.resume:
        if sharded:
            _load_sharded_checkpoint(ckpt, train_model, optimizer, scheduler)
        else:
            training.load_checkpoint(ckpt_path, model, optimizer, scheduler, ckpt=ckpt)
        if ckpt["extra"].get("scaler"):
            scaler.load_state_dict(ckpt["extra"]["scaler"])
        # The checkpoint's "rng" is rank 0's. On CPU every rank's generator is in the same state anyway; on CUDA rank
        # k draws from device k's generator, which only rank k's process has advanced: each rank takes its own.
        if ckpt["extra"].get("rng_per_rank"):
            training.set_rng_state(ckpt["extra"]["rng_per_rank"][rank])
        start_step, before = ckpt["step"], ckpt["extra"].get("before")
        ckpt = None  # its copies of the adapters and the optimiser state are in place now
        say(f"resumed {out} at step {start_step}/{steps}")
    metrics = training.MetricsLog(out / "metrics.jsonl", resume_step=start_step if args.resume else None) \
        if main_process else None

    # Every rank scores its share of the windows (distributed=True), so none idles at a collective meanwhile.
    eval_kw = dict(ctx=args.eval_ctx, stride=args.eval_stride, max_tokens=args.eval_max_tokens,
                   distributed=world > 1, progress=main_process)
    if eval_texts is not None and before is None:
        r = evaluate_perplexity(model, tokenizer, eval_texts, desc="base perplexity", **eval_kw)
        before = r.__dict__
        say(f"base model: {args.eval_data} perplexity {r.perplexity:.3f} ({r.tokens} tokens, "
            f"{r.bits_per_byte:.4f} bits/byte)")

    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[args.autocast])
                if args.autocast else contextlib.nullcontext())
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc="LAPT", unit="step", disable=not main_process)
    t0, tokens_done = time.perf_counter(), 0
    stop_at = steps if args.max_steps_this_run is None else min(steps, start_step + args.max_steps_this_run)
    step = start_step
    for step in range(start_step, stop_at):
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            first = step * global_batch + (micro * world + rank) * args.micro_batch
            batch = blocks.batch(first, args.micro_batch).to(device)
            last = micro == args.grad_accum - 1
            sync = train_model.no_sync() if world > 1 and not args.fsdp and not last else contextlib.nullcontext()
            if sharded:  # FSDP2: reduce-scatter the gradients only after the last micro-batch
                train_model.set_requires_gradient_sync(last)
            with sync, autocast:
                # The fused head + loss (Transformer.forward with targets): no [micro_batch, seq_len, vocab] logits.
                loss = train_model(batch[:, :-1], targets=batch[:, 1:])
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise training.NonFiniteLoss(
                f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is kept in "
                f"{ckpt_path} (try a lower --lr or --grad-clip)")
        scaler.unscale_(optimizer)
        # The norm is measured even when clipping is off (max_norm inf): a finite loss can still have gradients
        # that are not finite, and one AdamW step on them would turn every adapter weight into NaN.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf))
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            raise training.NonFiniteLoss(
                f"gradient norm is {grad_norm} at step {step + 1} (loss {loss_value:.4f}); stopping before the "
                f"update. The last good checkpoint is kept in {ckpt_path} (try a lower --lr)")
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)  # = optimizer.step(), unless float16 gradients overflowed: then the step is skipped
        scaler.update()
        if scaler.is_enabled() and not math.isfinite(grad_norm) and scaler.get_scale() < 1:
            raise training.NonFiniteLoss(
                f"gradient norm is {grad_norm} at step {step + 1} (loss {loss_value:.4f}), and float16 loss scaling "
                f"has skipped so many steps that its scale is down to {scaler.get_scale()}: gradients that are not "
                f"finite at a scale below 1 are not an overflow. The last good checkpoint is kept in {ckpt_path} (try "
                f"a lower --lr, or --autocast bfloat16)")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens_done += global_batch * args.seq_len
        rate = tokens_done / (time.perf_counter() - t0)
        record = {"step": step + 1, "loss": loss_value, "lr": lr,
                  "grad_norm": grad_norm, "tokens": (step + 1) * global_batch * args.seq_len,
                  "tokens_per_s": rate}
        if scale is not None:
            record["loss_scale"] = scale
            record["skipped"] = not math.isfinite(grad_norm)
        if val_batch is not None and ((step + 1) % args.eval_interval == 0 or step + 1 == steps):
            record["eval_loss"] = _validation_loss(model, val_batch.to(device), autocast)
        save_now = (step + 1) % args.save_interval == 0 or step + 1 in (steps, stop_at)
        full = _gather_full_state(model, optimizer) if save_now and sharded else {}  # every rank takes part
        rngs = _gather_rng_states() if save_now and world > 1 else None  # each rank's dropout/noise stream
        if main_process:
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if save_now:
                training.save_checkpoint(ckpt_path, model, optimizer, scheduler, step + 1, {"step": step + 1},
                                         extra={"before": before, "rng_per_rank": rngs, "settings": settings,
                                                "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                                         **full)
                training.loss_curve_svg(metrics.records, out / "loss.svg", f"LAPT of {args.model}")
    bar.close()
    if stop_at < steps:
        say(f"stopped after step {stop_at} as asked; continue with --resume")
        return {"stopped_at": stop_at}

    full = _gather_full_state(model, optimizer) if sharded else {}
    result = {"model": str(args.model), "steps": steps, "tokens": steps * global_batch * args.seq_len,
              "lora": summary, "before": before}
    # Evaluate first, on every rank, then save and export on rank 0 alone: no rank then waits at a collective while
    # another writes files (the adapter is already safe in the last checkpoint).
    after = None
    if eval_texts is not None:
        after = evaluate_perplexity(model, tokenizer, eval_texts, desc="adapted perplexity", **eval_kw)
    if main_process:
        model.eval()
        from lora import export_merged_hf, save_adapter, save_peft_adapter
        save_adapter(model, lora_cfg, out / "adapter", tensors=full.get("trainable"))
        if sharded and (args.export_peft or args.export_merged):  # these read whole weights off the model
            say("with --fsdp, export from the saved adapter: load the base, lora.load_adapter, then export")
            args.export_peft = args.export_merged = False
        if args.export_peft:
            save_peft_adapter(model, lora_cfg, out / "adapter-peft")
        if args.export_merged:
            export_merged_hf(model, model.args, out / "merged")
        if after is not None:
            result["after"] = after.__dict__
            drop = 1 - after.perplexity / before["perplexity"]
            result["perplexity_drop"] = drop
            say(f"\n{args.eval_data} perplexity: base {before['perplexity']:.3f} -> adapted {after.perplexity:.3f} "
                f"({drop:.1%} lower); bits/byte {before['bits_per_byte']:.4f} -> {after.bits_per_byte:.4f}")
        training.loss_curve_svg(metrics.records, out / "loss.svg", f"LAPT of {args.model}")
        training.atomic_write_text(out / "summary.json", json.dumps(result, indent=2))
        say(f"run folder: {out} (adapter/, metrics.jsonl, loss.svg, summary.json)")
    if world > 1:
        dist.destroy_process_group()
    return result


def _gather_full_state(model, optimizer) -> dict:
    """FSDP: whole (unsharded) trainable tensors and optimizer state, gathered with a collective every rank joins."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"trainable": model_state, "optimizer_state": optim_state}


def _gather_rng_states() -> list:
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, training.rng_state())
    return states


def _load_sharded_checkpoint(ckpt: dict, model, optimizer, scheduler) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=ckpt["trainable"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(ckpt["scheduler"])
    training.set_rng_state(ckpt["rng"])


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


def _on_rank_0_first(make, rank: int, world: int):
    """make() on rank 0 first, then on the other ranks: the first call writes a cache file (token files) that the
    others then read, instead of every process writing and renaming the same file at once."""
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        return make()
    finally:  # also when make() raised: the others then try, and raise the same error instead of waiting forever
        if world > 1 and rank == 0:
            dist.barrier()


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
def _validation_loss(model, batch, autocast) -> float:
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

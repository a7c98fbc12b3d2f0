"""Curie rehearsed at the paper's shape: a Mistral-7B-shaped random checkpoint through train, resume, eval, generate.

Everything else in the repository runs at SmolLM2 or tiny shapes; this runs the paper's own recipe (train.py --preset
curie: NF4 base, bf16, gradient checkpointing, NEFTune, LoRA r 32 on every projection and the head) on a checkpoint
of Mistral-7B's exact shape (32 layers, dim 4096, 32/8 heads, hidden 14336, vocab 32000, window 4096), written with
random weights as Hugging Face would ship it: sharded bf16 safetensors + index + config.json (+ Mistral's own
SentencePiece tokenizer, from the cache). Stages, each in a fresh child process:

    train      train.py --preset curie, 2 optimiser steps (micro-batch 1 of 256 tokens, no before/after eval)
    resume     the same run continued with --resume for its 3rd and last step
    eval       eval_ppl.py --quantize nf4 over ~1,000 tokens of the Polish test split (windows of 256)
    generate   generate.py --quantize nf4, 8 greedy tokens

and for each: wall time, CPU time (user / system), peak resident set (ru_maxrss = VmHWM: file-backed pages of a
mapped checkpoint count too, as a container's memory limit would count them), peak anonymous memory (RssAnon, sampled
every 0.2 s) and page faults (minor + major, from wait4's rusage). Printed as a markdown table for docs/benchmarks.md.

    python bench/curie_rehearsal.py                      # full 7B shape; the checkpoint (14.5 GB) is written once
    python bench/curie_rehearsal.py --layers 2           # same per-layer shapes, 2 layers (minutes)
    python bench/curie_rehearsal.py --write-only         # only write (or find) the checkpoint
    python bench/curie_rehearsal.py --compute float32    # the stages' products in float32 (see below)

--compute: the paper computes in bf16 (autocast over a bf16 base). A CPU without bf16 dot-product instructions
(AVX-512 BF16 or AMX; e.g. AMD Zen 3, AVX2 only) emulates bf16 products at a few GFLOP/s, ~30 minutes per 7B step,
so `auto` (the default) runs bf16 only where the hardware multiplies bf16 natively and float32 otherwise:
train.py --dtype float32 --autocast none (everything else of the curie preset unchanged), eval_ppl.py / generate.py
--dtype float32. The checkpoint stays bf16 on disk either way; the NF4 base is the same 4-bit codes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.safetensors import save_file  # noqa: E402
from model.sources import cache_dir  # noqa: E402
import training  # noqa: E402

# Mistral-7B-v0.1's config.json, the shape the paper adapted.
MISTRAL_7B = dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                  max_position_embeddings=32768, tie_word_embeddings=False, torch_dtype="bfloat16",
                  bos_token_id=1, eos_token_id=2, hidden_act="silu")
GB = 1e9


def layer_tensors(i: int, c: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Decoder layer i in Hugging Face names, bf16: projections ~ N(0, 0.02^2) (about Mistral's spread), norms 1."""
    d, h, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (h, d), "mlp.up_proj": (h, d), "mlp.down_proj": (d, h)}
    out = {f"model.layers.{i}.{k}.weight": (torch.randn(s, generator=gen) * 0.02).bfloat16()
           for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(d, dtype=torch.bfloat16)
    return out


def write_checkpoint(folder: Path, n_layers: int, layers_per_shard: int = 2) -> Path:
    """A random Mistral-7B-shaped checkpoint in the Hugging Face sharded layout, written shard by shard (at most
    one shard, ~0.9 GB, in memory); reused when its config.json is there (written last, so a complete folder)."""
    c = dict(MISTRAL_7B, num_hidden_layers=n_layers)
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == c:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    groups = [list(range(i, min(i + layers_per_shard, n_layers))) for i in range(0, n_layers, layers_per_shard)]
    n_shards = len(groups) + 1
    weight_map, total = {}, 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        if s == 0:  # the embeddings, the final norm and the head in a shard of their own
            d, v = c["hidden_size"], c["vocab_size"]
            tensors = {"model.embed_tokens.weight": (torch.randn(v, d, generator=gen) * 0.02).bfloat16(),
                       "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
                       "lm_head.weight": (torch.randn(v, d, generator=gen) * 0.02).bfloat16()}
        else:
            tensors = {}
            for i in groups[s - 1]:
                tensors.update(layer_tensors(i, c, gen))
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.itemsize for t in tensors.values())
        print(f"  wrote {folder / name} ({s + 1}/{n_shards})", file=sys.stderr, flush=True)
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tokenizer = cache_dir() / "mistral-tokenizer-v1" / "tokenizer.model.v1"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer}: Mistral's SentencePiece tokenizer is not in the cache")
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps(c, indent=1))
    return folder


def native_bf16(device: str = "cpu", cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 matrices natively, and the evidence (for the report); `cpuinfo` stands in
    for /proc/cpuinfo's text (tests)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"CUDA bf16 {'supported' if ok else 'not supported'}"
    found = training.cpu_bf16_flags(cpuinfo)
    return bool(found), ("CPU flags " + ", ".join(found)) if found else "CPU without avx512_bf16 / amx_bf16"


def _anon_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_stage(name: str, cmd: list[str], log: Path, repo: Path) -> dict:
    """Run cmd in a fresh child; its wall time, rusage (peak RSS, faults, CPU) and sampled peak RssAnon."""
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT)
        peak_anon, done = [0], threading.Event()

        def sample():
            while not done.wait(0.2):
                peak_anon[0] = max(peak_anon[0], _anon_bytes(proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"curie_rehearsal: stage {name} failed (exit {proc.returncode}); its output is in {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-20:]))
    r = dict(stage=name, wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime, peak_rss=ru.ru_maxrss * 1024,
             peak_anon=peak_anon[0], faults=ru.ru_minflt + ru.ru_majflt, major_faults=ru.ru_majflt)
    print(f"[{name}] {wall:.0f} s, peak RSS {r['peak_rss'] / GB:.2f} GB, anon {r['peak_anon'] / GB:.2f} GB, "
          f"{r['faults'] / 1e6:.2f} M faults", file=sys.stderr, flush=True)
    return r


def step_times(metrics: Path, resumed_at: int) -> list[float]:
    """Seconds per optimiser step from train.py's metrics.jsonl: its tokens_per_s counts the tokens since the process
    started training (the first run's, or the resumed one's from step `resumed_at` on)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    times, prev = [], 0.0
    for r in records:
        since = r["step"] if r["step"] <= resumed_at else r["step"] - resumed_at
        if r["step"] == resumed_at + 1:
            prev = 0.0
        elapsed = since * (r["tokens"] / r["step"]) / r["tokens_per_s"]
        times.append(elapsed - prev)
        prev = elapsed
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, help="checkpoint folder (default: the cache's mistral-7b-shape[-L<n>])")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Mistral-7B: 32); same shapes otherwise")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "curie-rehearsal", help="run folder and logs")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training step (the paper: 256)")
    p.add_argument("--eval-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--write-only", action="store_true", help="write (or find) the checkpoint and stop")
    p.add_argument("--stages", default="train,resume,eval,generate",
                   help="comma-separated: train, resume, eval, generate; also load (the NF4 load alone) and layer "
                        "(one decoder layer's NF4 projections, forward and backward)")
    p.add_argument("--compute", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="dtype of the stages' matrix products: bfloat16 (the paper), float32, or auto (bfloat16 where "
                        "the hardware has native bf16 products: CUDA with bf16, a CPU with avx512_bf16 or amx_bf16)")
    p.add_argument("--repo", type=Path, default=ROOT,
                   help="run the stages with the train.py / eval_ppl.py / generate.py of this checkout (before/after)")
    a = p.parse_args()
    a.out = a.out.resolve()
    native, why = native_bf16("cpu")
    compute = a.compute if a.compute != "auto" else ("bfloat16" if native else "float32")
    why = f"{'--compute ' + a.compute if a.compute != 'auto' else 'auto'}: {why}"
    print(f"compute dtype: {compute} ({why})", file=sys.stderr, flush=True)
    # bf16: the curie preset as it is (bf16 base, bf16 autocast); float32: a float32 base and no autocast.
    precision = [] if compute == "bfloat16" else ["--dtype", "float32", "--autocast", "none"]
    folder = a.folder or cache_dir() / ("mistral-7b-shape" if a.layers == 32 else f"mistral-7b-shape-L{a.layers}")
    t0 = time.perf_counter()
    write_checkpoint(folder, a.layers)
    print(f"checkpoint: {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / GB:.1f} GB, "
          f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if a.write_only:
        return
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    run = a.out / "run"
    py = [sys.executable]
    train = py + ["train.py", "--preset", "curie", "--model", str(folder), "--out", str(run), "--steps", "3",
                  "--micro-batch", "1", "--grad-accum", "1", "--seq-len", str(a.seq_len), "--no-eval",
                  "--eval-interval", "0", "--device", "cpu"] + precision
    commands = {
        "train": ("train (2 steps)", train + ["--max-steps-this-run", "2"]),
        "resume": ("resume (1 step)", train + ["--resume"]),
        "eval": (f"eval_ppl (~{a.eval_tokens} tokens)",
                 py + ["eval_ppl.py", "--model", str(folder), "--quantize", "nf4", "--dtype", compute, "--data",
                       "test", "--ctx", "256", "--stride", "256", "--max-tokens", str(a.eval_tokens), "--device",
                       "cpu"]),
        "generate": (f"generate ({a.new_tokens} tokens)",
                     py + ["generate.py", "--model", str(folder), "--quantize", "nf4", "--dtype", compute,
                           "--prompt", "Stolica Polski to", "--max-new-tokens", str(a.new_tokens), "--device", "cpu"]),
    }
    # load: model.load(quantize="nf4") alone, then the process's own VmHWM and the checkpoint's files still mapped.
    load_only = ("import sys, torch; from pathlib import Path; from model.loading import load\n"
                 "model, tok = load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), quantize='nf4')\n"
                 "maps = {l.split()[-1] for l in open('/proc/self/maps') if l.count(' ') >= 5}\n"
                 "print('files still mapped:', sum(str(f) in maps for f in Path(sys.argv[1]).iterdir()))\n")
    # layer: one decoder layer's seven NF4 projections (Mistral-7B's shapes), forward and backward over 16 tokens
    # (float32: bf16 products are slow on a CPU without AVX-512 bf16 and would hide it), once to warm up and once
    # timed: what the dequantisation costs (time, page faults) with the matrix products kept small.
    layer = ("import resource, sys, time, torch; from model import nf4\n"
             "torch.manual_seed(0); d, h, kv = 4096, 14336, 1024\n"
             "ps = [nf4.NF4Linear.from_weight(torch.randn(o, i) * 0.02) for o, i in "
             "((d, d), (kv, d), (kv, d), (d, d), (h, d), (h, d), (d, h))]\n"
             "x = {d: torch.randn(16, d, requires_grad=True), h: torch.randn(16, h, requires_grad=True)}\n"
             "def one():\n"
             "    for p in ps: p(x[p.in_features]).float().sum().backward()\n"
             "one(); f0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()\n"
             "one()\n"
             "f1 = resource.getrusage(resource.RUSAGE_SELF)\n"
             "print(f'per layer pass (forward + backward): {time.perf_counter() - t0:.2f} s, '\n"
             "      f'{(f1.ru_minflt - f0.ru_minflt) / 1e3:.0f} k page faults')\n")
    commands["load"] = ("load (NF4)", py + ["-c", load_only, str(folder), compute])
    commands["layer"] = ("one layer's NF4 fwd+bwd (x2)", py + ["-c", layer])
    wanted = a.stages.split(",")
    unknown = [s for s in wanted if s not in commands]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(commands)})")
    stages = [run_stage(*commands[s], a.out / f"{s}.log", a.repo.resolve()) for s in wanted]
    steps = step_times(run / "metrics.jsonl", resumed_at=2) if (run / "metrics.jsonl").exists() else []
    shape = f"{a.layers} layers" + (" (Mistral-7B)" if a.layers == 32 else " (Mistral-7B's per-layer shapes)")
    print(f"\nCurie rehearsal, {shape}; compute dtype {compute} ({why}); seconds per {a.seq_len}-token step: "
          f"{', '.join(f'{s:.1f}' for s in steps)}\n")
    print("| stage | wall (s) | user / sys CPU (s) | peak RSS, file pages incl. (GB) | peak anonymous (GB) "
          "| page faults (M) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in stages:
        print(f"| {r['stage']} | {r['wall_s']:.0f} | {r['user_s']:.0f} / {r['sys_s']:.0f} | {r['peak_rss'] / GB:.2f} "
              f"| {r['peak_anon'] / GB:.2f} | {r['faults'] / 1e6:.2f} |")
    (a.out / "rehearsal.json").write_text(json.dumps({"layers": a.layers, "repo": str(a.repo), "compute": compute,
                                                      "compute_why": why, "steps_s": steps,
                                                      "stages": stages}, indent=1))


if __name__ == "__main__":
    main()

"""Issue 2: peak RAM while `model.load` reads a checkpoint, against the model's own size (target <= 1.3x).

    python bench/load_memory.py            # ~1.3 GB bf16 model, three checkpoints written one at a time (<= 2.7 GB)
    python bench/load_memory.py --quick    # a few-MB model: checks the script, its ratios mean little

A Mistral-shaped model (dim 2048, 12 layers, 16 query / 4 KV heads of 128, hidden 5632, vocab 32000: 672 M
parameters, 1.34 GB in bf16; big enough that the model, not the interpreter, dominates) is written three ways with
random weights, each in the layout the loader reads:

  hf-bf16        Hugging Face's sharded layout, bf16: model-0000i-of-00003.safetensors + index + config.json
  mistral-bf16   Mistral's own layout, bf16: params.json + consolidated.safetensors (one file, our names)
  hf-fp32        the sharded layout in float32, loaded into bf16: each tensor is converted as it is read

Each load runs in a fresh child process (`--child`): it imports everything, resets Linux's resident high-water
mark (VmHWM), records its RSS as the baseline, calls `model.load(folder, dtype=torch.bfloat16,
require_tokenizer=False)`, then reads every weight once (a sum per tensor, which copies nothing). A bf16 tensor
of a bf16 file is a view into the memory-mapped file, so its pages become resident only when first read; the
second reading is what a first forward pass would cost. Reported: VmHWM minus the baseline after load() and after
that first read, against the model's bytes in bf16.

A second table (alone: --gguf-only) loads a real GGUF the same way (SmolLM2-135M-Instruct, Q4_1 + Q8_0 blocks)
into float32: as `load` gives it (linear layers holding the file's blocks, model/gguf_linear.py; the embeddings
float32) and with float32 weights alone; its peak is set against what the model then holds for good.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# `python bench/X.py` puts bench/ first on sys.path; the scripts import from the repo root instead (bench.common, ...).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (MB, load_average, load_float_weights, machine_summary, markdown_table, peak_rss,  # noqa: E402
                          report_to_parent, reset_peak_rss, run_child, verdict)
from lora.adapter import write_json  # noqa: E402
from model import convert  # noqa: E402
from model.args import ModelArgs  # noqa: E402
from model.safetensors import save_file  # noqa: E402
from model.transformer import Transformer  # noqa: E402

TARGET = 1.3
SHARDS = 3  # Mistral-7B's and Llama-2-7B's Hugging Face repositories ship theirs in 2-3 shards
FULL = ModelArgs(dim=2048, n_layers=12, head_dim=128, hidden_dim=5632, n_heads=16, n_kv_heads=4, norm_eps=1e-5,
                 vocab_size=32000, sliding_window=4096)
QUICK = ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=704, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=4000, sliding_window=4096)
TARGET_DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------------------ writing checkpoints

def weight_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Our name -> shape of every weight, in model order (read off a model on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Transformer(args).state_dict().items()}


def random_weight(name: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Matrices ~ N(0, 0.02^2), norm gains ~ N(1, 0.02^2). The q/k rows are random anyway, so no RoPE permutation
    is applied for the Hugging Face layout (the loader still applies its inverse, at its usual cost)."""
    mean = 1.0 if name.endswith("norm.weight") else 0.0
    return torch.empty(shape, dtype=dtype).normal_(mean, 0.02, generator=generator)


def write_hf_sharded(args: ModelArgs, folder: Path, dtype: torch.dtype) -> None:
    """config.json + SHARDS safetensors files (Hugging Face names) + model.safetensors.index.json. Each shard is
    made and written on its own, so the writer never holds more than one."""
    folder.mkdir(parents=True)
    shapes = weight_shapes(args)
    total = sum(shape.numel() for shape in shapes.values()) * dtype.itemsize
    # A tensor's shard: where its first byte falls when the model's bytes are cut into SHARDS equal parts.
    shard_of, offset = {}, 0
    for name, shape in shapes.items():
        shard_of[name] = offset * SHARDS // total
        offset += shape.numel() * dtype.itemsize
    files = [f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors" for i in range(SHARDS)]
    generator = torch.Generator().manual_seed(0)
    for i, file in enumerate(files):
        shard = {convert.to_hf_name(name): random_weight(name, shape, dtype, generator)
                 for name, shape in shapes.items() if shard_of[name] == i}
        save_file(shard, folder / file, metadata={"format": "pt"})
        del shard
    weight_map = {convert.to_hf_name(name): files[shard_of[name]] for name in shapes}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    config = args.to_hf_config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    write_json(folder / "model.safetensors.index.json", index)
    write_json(folder / "config.json", config)


def write_mistral(args: ModelArgs, folder: Path, dtype: torch.dtype) -> None:
    """params.json + consolidated.safetensors (our names, one file: the writer holds the whole model once)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weights = {name: random_weight(name, shape, dtype, generator) for name, shape in weight_shapes(args).items()}
    save_file(weights, folder / "consolidated.safetensors")
    write_json(folder / "params.json", args.to_params_json())


# ------------------------------------------------------------------------------------------------ the child

def child(folder: Path, dtype: torch.dtype = TARGET_DTYPE, gguf_blocks: bool = True) -> None:
    """Load `folder` (or a .gguf) in `dtype` in this fresh process and report its memory to the parent.
    gguf_blocks=False: a GGUF's linear layers as float32 weights (the plain model, then `model.fast.apply`)."""
    from model.gguf_linear import GGUFLinear
    from model.loading import load
    baseline = reset_peak_rss()
    start = time.perf_counter()
    if gguf_blocks:
        model, _ = load(folder, dtype=dtype, require_tokenizer=False)
    else:
        model, _ = load_float_weights(folder, dtype, require_tokenizer=False)
    seconds = time.perf_counter() - start
    peak_load = peak_rss()
    # Distinct tensors only (a tied head would be counted twice); a sum reads every page and copies nothing.
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    with torch.no_grad():
        for t in tensors.values():   # (an integer sum would copy the tensor into int64 first; max does not)
            t.sum() if t.is_floating_point() else t.max()
    blocks = {t.data_ptr() for m in model.modules() if isinstance(m, GGUFLinear) for t in m.buffers()}
    report_to_parent({"baseline": baseline, "peak_load": peak_load, "peak_read": peak_rss(), "seconds": seconds,
                      "model_bytes": sum(t.nbytes for p, t in tensors.items() if p not in blocks),
                      "blocks_bytes": sum(t.nbytes for p, t in tensors.items() if p in blocks),
                      "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})})


# ----------------------------------------------------------------------------------------------- the parent

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model: checks that the script runs")
    p.add_argument("--dir", type=Path, default=None,
                   help="where to write the checkpoints (default: a temporary folder, deleted afterwards)")
    p.add_argument("--gguf-only", action="store_true", help="only the GGUF table (the real SmolLM2 GGUF)")
    p.add_argument("--child", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--child-gguf-blocks", type=int, choices=(0, 1), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child_gguf_blocks is None:
            child(a.child)
        else:
            child(a.child, torch.float32, bool(a.child_gguf_blocks))
        return
    if a.gguf_only:
        gguf_table()
        print(f"\nload average at the end: {load_average()}")
        return

    args = QUICK if a.quick else FULL
    print(f"machine: {machine_summary(torch.get_num_threads())}")
    print(f"model: dim {args.dim}, {args.n_layers} layers, hidden {args.hidden_dim}, vocab {args.vocab_size}: "
          f"{args.num_params() / 1e6:.0f} M parameters, {args.num_params() * 2 / MB:.0f} MB in bf16\n")
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="minicurie-load-memory-") as tmp:
        cases = [("hf-bf16", write_hf_sharded, torch.bfloat16), ("mistral-bf16", write_mistral, torch.bfloat16),
                 ("hf-fp32", write_hf_sharded, torch.float32)]
        rows = []
        for name, write, file_dtype in cases:
            folder = Path(tmp) / name
            start = time.perf_counter()
            write(args, folder, file_dtype)
            file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            print(f"wrote {name}: {file_bytes / MB:.0f} MB in {time.perf_counter() - start:.0f} s", flush=True)
            r = run_child(Path(__file__), ["--child", str(folder)], timeout=900)
            load_mb, read_mb = (r["peak_load"] - r["baseline"]) / MB, (r["peak_read"] - r["baseline"]) / MB
            ratio = (r["peak_read"] - r["baseline"]) / r["model_bytes"]
            rows.append([name, f"{str(file_dtype).removeprefix('torch.')} -> {', '.join(r['dtypes'])}",
                         f"{file_bytes / MB:.0f}", f"{r['model_bytes'] / MB:.0f}", f"{r['baseline'] / MB:.0f}",
                         f"{load_mb:.0f}", f"{read_mb:.0f}", f"{ratio:.2f}x", f"<= {TARGET}x",
                         verdict(ratio, TARGET, higher_is_better=False), f"{r['seconds']:.1f}"])
            # Drop this checkpoint before writing the next: three of them need not share the disk at once.
            for f in folder.iterdir():
                f.unlink()
    print()
    print(markdown_table(["checkpoint", "file -> model dtype", "files MB", "model MB", "child baseline MB",
                          "peak above baseline, load() MB", "peak above baseline, + first read MB",
                          "peak / model", "target", "verdict", "load() s"], rows))
    if not a.quick:
        gguf_table()
    print(f"\nload average at the end: {load_average()}")


def gguf_table() -> None:
    """The real SmolLM2 GGUF into float32: `load`'s model (linear layers as the file's blocks) and float32 weights
    alone. 'held' is what the model then holds for good: its float tensors and its blocks."""
    from model.sources import resolve
    path = resolve("smollm2-135m")
    rows = []
    for blocks in (0, 1):
        r = run_child(Path(__file__), ["--child", str(path), "--child-gguf-blocks", str(blocks)], timeout=900)
        peak = r["peak_read"] - r["baseline"]
        held = r["model_bytes"] + r["blocks_bytes"]
        rows.append([f"{path.name}, {'GGUF blocks (load)' if blocks else 'float32 weights alone'}",
                     f"{path.stat().st_size / MB:.0f}", f"{r['model_bytes'] / MB:.0f}", f"{r['blocks_bytes'] / MB:.0f}",
                     f"{held / MB:.0f}", f"{(r['peak_load'] - r['baseline']) / MB:.0f}", f"{peak / MB:.0f}",
                     f"{peak / held:.2f}x", f"<= {TARGET}x", verdict(peak / held, TARGET, higher_is_better=False),
                     f"{r['seconds']:.1f}"])
    print()
    print(markdown_table(["GGUF -> float32", "file MB", "float tensors MB", "blocks MB", "held MB",
                          "peak above baseline, load() MB", "+ first read MB", "peak / held", "target", "verdict",
                          "load() s"], rows))


if __name__ == "__main__":
    main()

"""Memory of a Mistral-7B-shaped model held in NF4 (issue 7, acceptance 5): weights <= 4.2 GB, peak RAM < 8 GB.

The model is built on the meta device (no memory), then one decoder layer at a time is given real storage, filled
with random weights and quantised before the next exists, so at most one layer (0.44 GB in bf16) is ever at full
precision. The embeddings, the final norm and the head stay in bf16, as in QLoRA. Reported:

    weights   bytes of every parameter and buffer of the finished model (a tied tensor counted once)
    peak RSS  the process's resident high-water mark (VmHWM in /proc/self/status), torch itself included

    python bench/nf4_memory.py                            # Mistral-7B shape, ~12 min on 2 busy cores
    python bench/nf4_memory.py --preset smollm2-135m      # seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.args import ModelArgs  # noqa: E402
from model.nf4 import NF4Linear, quantize_model_  # noqa: E402
from model.transformer import Transformer  # noqa: E402

GB = 1e9
WEIGHT_LIMIT_GB, PEAK_LIMIT_GB = 4.2, 8.0


def proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status ('VmRSS', 'VmHWM'), in bytes (the file gives kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes in NF4 layers, bytes in everything else) over distinct storages of parameters and buffers."""
    seen: set[int] = set()
    nf4 = other = 0
    for module in model.modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            if isinstance(module, NF4Linear):
                nf4 += storage.nbytes()
            else:
                other += storage.nbytes()
    return nf4, other


@torch.no_grad()
def fill_random_(module: torch.nn.Module) -> None:
    """Weight matrices ~ N(0, 0.02^2) (about Mistral's spread), norm gains 1."""
    for p in module.parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.02)
        else:
            p.fill_(1.0)


def build_nf4_model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    for i, layer in enumerate(model.layers):
        t0 = time.perf_counter()
        layer.to_empty(device="cpu")
        fill_random_(layer)
        quantize_model_(layer)
        print(f"  layer {i + 1}/{args.n_layers} quantised in {time.perf_counter() - t0:.1f} s, "
              f"RSS {proc_status_bytes('VmRSS') / GB:.2f} GB", file=sys.stderr, flush=True)
    for module in (model.tok_embeddings, model.norm, model.output):
        module.to_empty(device="cpu")
        fill_random_(module)
    model.tie_weights()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral-7b-v0.1", help="ModelArgs preset (model/args.py)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the layers before quantising and of the parts left unquantised")
    opts = ap.parse_args()
    args = ModelArgs.from_name(opts.preset)
    dtype = getattr(torch, opts.dtype)

    t0 = time.perf_counter()
    model = build_nf4_model(args, dtype)
    seconds = time.perf_counter() - t0
    nf4, other = weight_bytes(model)
    total, peak = (nf4 + other) / GB, proc_status_bytes("VmHWM") / GB
    full = args.num_params() * dtype.itemsize / GB
    n_quantised = sum(isinstance(m, NF4Linear) for m in model.modules())

    print(f"{opts.preset}: {args.num_params():,} parameters, {n_quantised} linear layers in NF4, the rest in "
          f"{opts.dtype} ({full:.2f} GB if all were {opts.dtype}); built and quantised in {seconds:.0f} s")
    print("| model | NF4 layers | other weights | weights total | peak RSS | time |")
    print("|---|---|---|---|---|---|")
    print(f"| {opts.preset} | {nf4 / GB:.3f} GB | {other / GB:.3f} GB ({opts.dtype}) | {total:.3f} GB | "
          f"{peak:.2f} GB | {seconds:.0f} s |")
    if opts.preset == "mistral-7b-v0.1":
        ok = total <= WEIGHT_LIMIT_GB and peak < PEAK_LIMIT_GB
        print(f"acceptance (weights <= {WEIGHT_LIMIT_GB} GB, peak RSS < {PEAK_LIMIT_GB} GB): "
              f"{'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

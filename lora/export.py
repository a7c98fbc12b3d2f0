"""Handing a trained adapter to the Hugging Face world: as a peft adapter, or merged into a full checkpoint.

Two things change on the way out. Names: ours are Mistral's (layers.0.attention.wq), Hugging Face's are
model.layers.0.self_attn.q_proj (model/convert.py holds the table). And the RoPE row layout of wq and wk: ours
rotates adjacent pairs of features, Hugging Face rotates the two halves of each head, so its q_proj/k_proj rows are
a permutation P of ours. For the LoRA update that is a permutation of B's rows only:

    W_hf + dW_hf = P (W + scale * B @ A) = P W + scale * (P B) @ A

so lora_B of wq/wk is permuted (per query head for wq, per key/value head for wk) and lora_A is left alone.

    save_peft_adapter    adapter_model.safetensors + adapter_config.json, loadable by peft.PeftModel.from_pretrained
    export_merged_hf     the merged model: model-0000i-of-0000n.safetensors + model.safetensors.index.json +
                         config.json, loadable by transformers.AutoModelForCausalLM.from_pretrained
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from lora.adapter import write_json
from lora.inject import HF_TARGET_NAMES, LoRAConfig, check_lora_config, lora_modules
from lora.layers import LoRALinear
from model.args import ModelArgs
from model.convert import interleaved_to_half, is_rope_projection, to_hf_name
from model.safetensors import save_file

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"


def _to_hf_rows(name: str, rows: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Rows of our tensor `name` (a wq/wk weight or its lora_B) in Hugging Face's rotate-half order."""
    rope = is_rope_projection(name)
    if rope is None:
        return rows
    return interleaved_to_half(rows, args.n_heads if rope == "q" else args.n_kv_heads)


def peft_state_dict(model: nn.Module, args: ModelArgs) -> dict[str, torch.Tensor]:
    """peft's names -> tensors: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ..."""
    state = {}
    for name, m in lora_modules(model).items():
        hf_module = to_hf_name(f"{name}.weight").removesuffix(".weight")
        state[f"base_model.model.{hf_module}.lora_A.weight"] = m.lora_A.detach()
        state[f"base_model.model.{hf_module}.lora_B.weight"] = _to_hf_rows(f"{name}.weight", m.lora_B.detach(), args)
    return state


def save_peft_adapter(model: nn.Module, cfg: LoRAConfig, folder: str | Path) -> None:
    check_lora_config(model, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in peft_state_dict(model, model.args).items()}
    save_file(tensors, folder / PEFT_WEIGHTS, metadata={"format": "pt"})  # peft (via transformers) wants "format"
    write_json(folder / PEFT_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted(HF_TARGET_NAMES[t] for t in cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
    })


def export_merged_hf(model: nn.Module, args: ModelArgs, folder: str | Path,
                     max_shard_bytes: int = 5 * 10**9) -> None:
    """Write the model with every adapter folded in (W + scale * B @ A) as a sharded Hugging Face checkpoint.

    The model itself is not modified: each merged weight is computed as its shard is written, so peak memory is one
    shard. A head tied to the embeddings is written once (as Hugging Face does, no lm_head) unless it carries LoRA:
    then the merged head differs from the embeddings and is written untied (so is a head untied by remove_lora).
    """
    folder = Path(folder)
    layers = lora_modules(model)
    exact = _exact_bases(model)   # layers holding a GGUF's blocks: their weights are rebuilt as their shard is written
    for name, m in layers.items():
        if not (isinstance(m.base, nn.Linear) and m.base.weight.is_floating_point()) and f"{name}.base" not in exact:
            raise TypeError(f"cannot merge LoRA into {name!r}: its base is a {type(m.base).__name__}; load the "
                            "adapter onto the full-precision model and export that")
    base_of = {f"{name}.base.weight": m for name, m in layers.items()}
    state = _with_exact_weights(model.state_dict(keep_vars=True), exact)
    # The head is tied when it is the embedding matrix itself (or holds the embeddings' own GGUF blocks); an
    # adapter on it (merged or not) unties it.
    tied = "output" not in layers and (state["output.weight"] is state["tok_embeddings.weight"]
                                       or getattr(exact.get("output"), "tied_embeddings", False))

    # (Hugging Face name, bytes, how to make the tensor), in model order; nothing is computed yet.
    plan: list[tuple[str, int, Callable[[], torch.Tensor]]] = []
    for key, t in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        lora = base_of.get(key)
        name = key.replace(".base.weight", ".weight") if lora is not None else key
        if name == "output.weight" and tied:
            continue  # Hugging Face stores a tied head once, as the embeddings
        if not (name.endswith(".weight") and t.is_floating_point()) or (t.is_meta and key[:-7] not in exact):
            raise ValueError(f"cannot export {key!r} ({t.dtype}{', meta device' if t.is_meta else ''}): only "
                             "full-precision weights can be written (load the full-precision model)")
        plan.append((to_hf_name(name), t.numel() * t.element_size(), _merged(name, t, lora, args,
                                                                             exact.get(key[:-len(".weight")]))))

    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for hf_name, nbytes, make in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:  # a tensor bigger than a shard gets a shard to itself
            shards.append([])
            size = 0
        shards[-1].append((hf_name, make))
        size += nbytes

    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for filename, shard in zip(files, shards):
        tensors = {hf_name: make().cpu().contiguous() for hf_name, make in shard}
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    total = sum(nbytes for _, nbytes, _ in plan)
    write_json(folder / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    config = args.to_hf_config()
    config["tie_word_embeddings"] = tied
    config["torch_dtype"] = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    write_json(folder / HF_CONFIG, config)
    # Shards of an earlier export into this folder would shadow (model.safetensors) or clutter this one.
    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors"]:
        if stale.name not in files and stale.exists():
            stale.unlink()


def _exact_bases(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold a weight in another exact format and rebuild it on demand (GGUFLinear: `to_linear`)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "to_linear") and hasattr(m, "dequantize")}


def _with_exact_weights(state: dict[str, torch.Tensor], exact: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict with each exact base's buffers replaced by one `<name>.weight`: a meta tensor of the weight's
    shape and dtype (float32), which `_merged` makes real when its shard is written."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        owner = next((n for n in exact if key.startswith(f"{n}.") and "." not in key[len(n) + 1:]), None)
        if owner is None:
            out[key] = t
        elif f"{owner}.weight" not in out:
            m = exact[owner]
            out[f"{owner}.weight"] = torch.empty(m.out_features, m.in_features, device="meta")
    return out


def _merged(name: str, weight: torch.Tensor, lora: LoRALinear | None, args: ModelArgs,
            exact: nn.Module | None = None) -> Callable[[], torch.Tensor]:
    """A function making our tensor `name` merged (if it has LoRA) and in Hugging Face's row layout; `exact`: the
    module whose blocks rebuild the weight (`weight` is then only its meta shape)."""
    def make() -> torch.Tensor:
        w = exact.dequantize() if exact is not None else weight.detach()
        if lora is not None and not lora.merged:  # a merged layer's weight already holds its update
            w = (w.float() + lora.delta_weight()).to(w.dtype)
        return _to_hf_rows(name, w, args)
    return make

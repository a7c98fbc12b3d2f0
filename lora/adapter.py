"""Saving and loading a LoRA adapter in our own layout: the few trained tensors, never the frozen base.

    folder/adapter.safetensors     'layers.0.attention.wq.lora_A' [r, in], '... .lora_B' [out, r], ...  (our names)
    folder/adapter_config.json     {"lora": LoRAConfig, "model_args": ModelArgs of the base model}

Curie's adapter is 85M parameters (340 MB in float32) against 7.2B in the base, so a training run checkpoints only
this. Loading injects the layers if the model has none yet, then checks every tensor against the model: an adapter
trained on another base model fails with the folder, the tensor and both shapes named.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from lora.inject import LoRAConfig, check_lora_config, inject_lora, lora_modules
from model.safetensors import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a temporary file beside `path`, then os.replace): a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> the LoRA tensors: 'layers.0.attention.wq.lora_A', 'layers.0.attention.wq.lora_B', ..."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A"] = m.lora_A
        state[f"{name}.lora_B"] = m.lora_B
    return state


def save_adapter(model: nn.Module, cfg: LoRAConfig, folder: str | Path,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter of `model`. `tensors` (our names) overrides the model's own LoRA tensors: a sharded (FSDP)
    model hands in the gathered full tensors here."""
    check_lora_config(model, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = adapter_state_dict(model).keys()
    source = adapter_state_dict(model) if tensors is None else {k: tensors[k] for k in names}
    tensors = {k: v.detach().cpu().contiguous() for k, v in source.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS)  # atomic, like every writer of ours
    write_json(folder / ADAPTER_CONFIG, {"lora": cfg.to_dict(), "model_args": model.args.to_params_json()})


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config (is {folder} a minicurie adapter folder?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "lora" not in d:
        raise ValueError(f"{path}: has no 'lora' section (a peft adapter_config.json is not ours)")
    return d


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Load the adapter in `folder` into `model` (injecting LoRA layers first if it has none) -> its LoRAConfig."""
    folder = Path(folder)
    try:
        cfg = LoRAConfig.from_dict(read_adapter_config(folder)["lora"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: {e}") from None
    if lora_modules(model):
        try:
            check_lora_config(model, cfg)
        except ValueError as e:
            raise ValueError(f"{folder}: the model's LoRA layers do not match this adapter: {e}") from None
    else:
        inject_lora(model, cfg)
    if any(m.merged for m in lora_modules(model).values()):
        raise ValueError(f"{folder}: cannot load an adapter into merged LoRA layers; unmerge_lora(model) first")

    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: adapter weights not found")
    loaded = load_file(path)
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params))
    if missing:
        raise ValueError(f"{path}: lacks {len(missing)} LoRA tensor(s) the model has, e.g. {missing[0]!r}")
    if unexpected:
        raise ValueError(f"{path}: has {len(unexpected)} tensor(s) the model has no place for, e.g. "
                         f"{unexpected[0]!r}")
    for name, p in params.items():
        if loaded[name].shape != p.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(loaded[name].shape)}, the model's is "
                             f"{tuple(p.shape)} (adapter made for another base model?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded[name])
    return cfg

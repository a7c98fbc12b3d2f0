"""LoRAConfig and model surgery: wrap the target linear layers of a Transformer in LoRALinear, freeze the rest.

Curie-7B's language-adaptive pre-training (section 3 of the paper) puts rank-32, alpha-64 adapters on every linear
layer of Mistral-7B, attention, feed-forward and the output head, and trains only those: 85,041,152 parameters,
1.17% of the 7,241,732,096 in the base model.

Targets are our (Mistral's) module leaf names; Hugging Face / peft names are accepted and mapped through
model/convert.py, so a peft recipe's `target_modules` can be copied as it is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.nn as nn

from lora.layers import LoRALinear
from model.convert import to_hf_name
from model.nf4 import NF4Linear

# Our leaf name -> Hugging Face's, read off model/convert.py's tables through a representative full name.
_OUR_LINEARS = {"wq": "layers.0.attention.wq", "wk": "layers.0.attention.wk", "wv": "layers.0.attention.wv",
                "wo": "layers.0.attention.wo", "w1": "layers.0.feed_forward.w1", "w2": "layers.0.feed_forward.w2",
                "w3": "layers.0.feed_forward.w3", "output": "output"}
HF_TARGET_NAMES: dict[str, str] = {
    ours: to_hf_name(f"{path}.weight").removesuffix(".weight").rpartition(".")[2] for ours, path in _OUR_LINEARS.items()
}
_FROM_HF = {hf: ours for ours, hf in HF_TARGET_NAMES.items()}


@dataclass
class LoRAConfig:
    r: int = 32
    alpha: float = 64
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r={self.r} must be >= 1")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1]")
        if isinstance(self.targets, str):
            raise TypeError(f"LoRA targets must be a sequence of module names, not the string {self.targets!r}")
        targets = []
        for t in self.targets:
            ours = t if t in HF_TARGET_NAMES else _FROM_HF.get(t)
            if ours is None:
                raise ValueError(f"unknown LoRA target {t!r}; ours: {', '.join(HF_TARGET_NAMES)}; "
                                 f"Hugging Face's: {', '.join(_FROM_HF)}")
            if ours not in targets:
                targets.append(ours)
        self.targets = tuple(targets)

    @classmethod
    def curie(cls) -> "LoRAConfig":
        """The paper's LAPT recipe: r=32, alpha=64, dropout 0.05 on all seven projections and the head."""
        return cls(r=32, alpha=64, dropout=0.05, targets=tuple(_OUR_LINEARS))

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s): {', '.join(unknown)}")
        return cls(**{**d, "targets": tuple(d.get("targets", cls.targets))})


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target linear layer of `model` in a LoRALinear, in place; freeze everything else.

    Returns the names of the wrapped modules ('layers.0.attention.wq', ..., 'output'). A head tied to the
    embeddings is wrapped as it is: its weight stays the embedding's very tensor (no copy, no untying).
    On a model that `model.fast.apply` accelerated (what `model.load` returns), the adapters are swapped for their
    memory-lean training variant too (lora/lean.py); on the plain model they stay plain LoRALinear.
    """
    from model import fast
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; remove_lora() first to inject a new configuration")
    # Which modules own each parameter: a weight owned twice is tied (SmolLM2's head and embeddings).
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1

    # Find and check every target before replacing any, so that a bad configuration leaves the model untouched.
    targets = set(cfg.targets)
    found = [(name, module) for name, module in model.named_modules() if name.rpartition(".")[2] in targets]
    for name, module in found:
        if not isinstance(getattr(module, "in_features", None), int):
            raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer")
    unmatched = targets - {name.rpartition(".")[2] for name, _ in found}
    if unmatched:
        raise ValueError(f"LoRA target(s) {', '.join(sorted(unmatched))} match no module of "
                         f"{type(model).__name__}")

    accelerated = fast.applied(model)
    for name, module in found:
        weight = getattr(module, "weight", None)
        shared = isinstance(weight, nn.Parameter) and owners[id(weight)] > 1
        wrapped = LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, shared_weight=shared)
        wrapped.train(module.training)  # a new module starts in training mode: its dropout must follow the model's
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, wrapped)
    if accelerated:
        fast.apply(model)
    mark_only_lora_trainable(model)
    return [name for name, _ in found]


def check_lora_config(model: nn.Module, cfg: LoRAConfig) -> None:
    """Raise unless `model`'s LoRA layers are exactly what `cfg` describes (before writing cfg beside them)."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model has no LoRA layers: inject_lora(model, cfg) first")
    found = {name.rpartition(".")[2] for name in layers}
    if found != set(cfg.targets):
        raise ValueError(f"LoRA targets in the model ({', '.join(sorted(found))}) differ from the config's "
                         f"({', '.join(sorted(cfg.targets))})")
    for name, m in layers.items():
        if (m.r, m.alpha, m.rslora) != (cfg.r, cfg.alpha, cfg.rslora):
            raise ValueError(f"LoRA layer {name!r} has r={m.r}, alpha={m.alpha}, rslora={m.rslora}; the config says "
                             f"r={cfg.r}, alpha={cfg.alpha}, rslora={cfg.rslora}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once. A quantised layer (NF4, GGUF blocks) holds its
    weight in buffers, not parameters: it counts as the in_features x out_features weights it stands for (a head
    holding the embeddings' blocks, once, as the embeddings)."""
    from model.gguf_linear import GGUFLinear
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    quantised = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, NF4Linear) or (isinstance(m, GGUFLinear) and not m.tied_embeddings))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantised


def parameter_summary(model: nn.Module) -> str:
    """One line: trainable parameters, and their share of the base (non-LoRA) parameters, as the paper reports."""
    trainable, total = count_parameters(model)
    adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
    base = total - adapter
    return f"trainable parameters: {trainable:,} ({100 * trainable / base:.2f}% of the {base:,} base parameters)"


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale * B @ A); the forward then costs what the base costs."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Replace every LoRALinear by its base layer: merged into it (merge=True) or discarded (merge=False).

    Merging a tied head leaves it untied: the merged head is no longer the embedding matrix (so do not call
    `model.tie_weights()` afterwards).
    """
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.base)

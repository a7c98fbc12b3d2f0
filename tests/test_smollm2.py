"""The real SmolLM2-135M GGUF: our decoder against transformers' own GGUF loader (acceptance 3)."""
import pytest
import torch

from model import generate, load

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEXT = ("Język polski należy do grupy języków zachodniosłowiańskich. Posługuje się nim około 45 milionów ludzi, "
        "głównie w Polsce. Źródłosłów wielu wyrazów sięga łaciny, niemieckiego i czeskiego; zażółć gęślą jaźń! "
        "The Polish language belongs to the West Slavic group. It is written in the Latin alphabet with nine extra "
        "letters: ą, ć, ę, ł, ń, ó, ś, ź and ż. Stolicą Polski jest Warszawa, położona nad Wisłą; Kraków był nią do "
        "1596 roku. Man pages in Polish describe commands such as ls, grep and awk: „ls wyświetla zawartość "
        "katalogu”. Rok 2024 przyniósł 366 dni, a luty miał ich 29. ") * 2


@pytest.fixture(scope="module")
def models(smollm2_gguf, smollm2_hf_model):
    ours, tokenizer = load(smollm2_gguf)
    return ours, tokenizer, smollm2_hf_model


def test_logits_match_transformers_on_256_tokens(models):
    ours, tokenizer, hf = models
    ids = tokenizer.encode(TEXT, bos=True)
    assert len(ids) >= 256
    x = torch.tensor([ids[:256]])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-3


def test_greedy_generation_is_token_identical(models):
    ours, tokenizer, hf = models
    prompt = tokenizer.encode("Stolicą Polski jest Warszawa, a największą rzeką", bos=True)
    mine = list(generate(ours, prompt, 32))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    assert mine == theirs.tolist()
    assert len(mine) == 32


def test_speculative_greedy_on_the_real_model_gives_the_same_tokens(models, smollm2_gguf, capsys):
    """Prompt lookup on text that repeats itself: the real fp32 model's chunked verification picks the tokens of
    plain greedy decoding, through the library and through generate.py."""
    import generate as generate_cli
    ours, tokenizer, _ = models
    prompt = tokenizer.encode(TEXT[:400])             # as generate.py does: SmolLM2 adds no BOS
    plain = list(generate(ours, prompt, 24))
    assert list(generate(ours, prompt, 24, draft_tokens=6)) == plain
    capsys.readouterr()
    generate_cli.main(["--model", str(smollm2_gguf), "--prompt", TEXT[:400], "--max-new-tokens", "24",
                       "--draft-tokens", "6"])
    assert capsys.readouterr().out == TEXT[:400] + tokenizer.decode(plain)

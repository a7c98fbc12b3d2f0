"""Each checkpoint's own BOS convention, end to end: generate.py against transformers' greedy `generate`, each side
tokenising the prompt its own way (SmolLM2's GGUF: no BOS; Mistral's SentencePiece: BOS), and eval_ppl against
transformers' strided perplexity (https://huggingface.co/docs/transformers/perplexity: no BOS for SmolLM2, the
first token unscored)."""
import json
import math
import shutil

import pytest
import sentencepiece
import torch

import eval_ppl
import generate as generate_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPTS = ["The capital of France is", "Stolicą Polski jest Warszawa, a największą rzeką"]


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_hf_model, smollm2_hf_tokenizer):
    return smollm2_hf_model, smollm2_hf_tokenizer


def cli_text(capsys, argv) -> str:
    capsys.readouterr()
    generate_cli.main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_cli_equals_transformers_on_smollm2(smollm2_gguf, smollm2_hf, capsys, prompt):
    from model.tokenizer import load_tokenizer
    hf, hf_tok = smollm2_hf
    ids = hf_tok(prompt).input_ids
    ours = load_tokenizer(smollm2_gguf)
    assert ours.encode(prompt) == ids and ids[0] != hf_tok.bos_token_id  # neither side puts <|im_start|> first
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    expected = prompt + ours.decode(ids + new)[len(ours.decode(ids)):]
    out = cli_text(capsys, ["--model", str(smollm2_gguf), "--prompt", prompt, "--max-new-tokens", "16",
                            "--device", "cpu"])
    assert out == expected
    assert len(new) == 16 or new[-1] == hf_tok.eos_token_id


def test_generate_cli_equals_transformers_on_tiny_mistral_with_bos(tmp_path, mistral_tokenizer_path, capsys):
    """A tiny random Mistral in Hugging Face layout with Mistral's real tokenizer.model: BOS on both sides."""
    torch.manual_seed(5)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4096,
                                     bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(mistral_tokenizer_path, tmp_path / "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    for prompt in PROMPTS:
        ids = [sp.bos_id()] + sp.encode(prompt)              # what transformers' LlamaTokenizer gives Mistral
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        expected = prompt + sp.decode(ids + new)[len(sp.decode(ids)):]
        out = cli_text(capsys, ["--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12",
                                "--device", "cpu"])
        assert out == expected, prompt


def strided_perplexity(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """transformers' recipe (windows of max_length tokens every stride, each scoring the targets the previous one
    did not reach, the first token unscored), with the per-token log-probabilities summed exactly: the recipe as
    printed weights each window's mean loss by one token too few, a bookkeeping shortcut, not a definition."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for t in range(max(prev_end, begin + 1), end):
            nll -= logp[t - begin - 1, ids[t]].item()
            n += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / n), n


TEXT = ("Polecenie ls wyświetla informacje o plikach, domyślnie o bieżącym katalogu. Opcja -l używa długiego "
        "formatu listy. Żółta łódź płynęła po Wiśle, a źródło rzeki leży w Beskidach. The quick brown fox jumps "
        "over the lazy dog while the committee deliberates. ") * 6


def test_eval_ppl_equals_transformers_strided_perplexity(smollm2_gguf, smollm2_hf, tmp_path, capsys):
    hf, hf_tok = smollm2_hf
    ids = hf_tok(TEXT).input_ids
    assert len(ids) > 600                                  # three windows of 512 at stride 256
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    capsys.readouterr()
    eval_ppl.main(["--model", str(smollm2_gguf), "--data", str(text), "--ctx", "512", "--stride", "256", "--json"])
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["tokens"] == len(ids) - 1                # every token but the first, which has no BOS before it
    assert result["bits_per_byte"] == pytest.approx(result["nll"] / math.log(2) / len(TEXT.encode()))
    # --ctx C reads C tokens and scores C targets: the recipe's max_length C + 1, to float32 rounding...
    ppl, n = strided_perplexity(hf, ids, 513, 256)
    assert n == result["tokens"] and result["perplexity"] == pytest.approx(ppl, rel=1e-4)
    # ...and with max_length 512 (one token less of context per window) within 0.1% still.
    ppl, n = strided_perplexity(hf, ids, 512, 256)
    assert n == result["tokens"] and result["perplexity"] == pytest.approx(ppl, rel=1e-3)


def test_tokenizers_carry_their_checkpoint_conventions(smollm2_gguf, mistral_tokenizer_path, tmp_path):
    from model.gguf import GGUFFile
    from model.tokenizer import ByteLevelBPETokenizer, load_tokenizer
    metadata = GGUFFile(smollm2_gguf).metadata
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    smol = load_tokenizer(smollm2_gguf)
    assert (smol.add_bos, smol.add_eos, smol.stop_ids) == (False, False, (smol.eos_id,))
    assert smol.encode("Ala ma kota")[0] != smol.bos_id
    assert smol.encode("Ala ma kota", bos=True) == [smol.bos_id] + smol.encode("Ala ma kota")
    with_bos = ByteLevelBPETokenizer.from_metadata({**metadata, "tokenizer.ggml.add_bos_token": True,
                                                    "tokenizer.ggml.add_eos_token": True})
    assert with_bos.encode("Ala") == [smol.bos_id] + smol.encode("Ala") + [smol.eos_id]
    assert with_bos.encode("Ala", bos=False, eos=False) == smol.encode("Ala")

    mistral = load_tokenizer(mistral_tokenizer_path)
    assert (mistral.add_bos, mistral.add_eos) == (True, False) and mistral.encode("Ala")[0] == mistral.bos_id
    # A Hugging Face folder's settings apply to its tokenizer.model: add_bos_token, and stop ids from a list.
    shutil.copy(mistral_tokenizer_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32]}))
    folder = load_tokenizer(tmp_path)
    assert (folder.add_bos, folder.add_eos, folder.stop_ids) == (False, True, (2, 32))
    assert folder.encode("Ala") == mistral.encode("Ala", bos=False) + [2]


def test_generation_stops_at_any_stop_id_and_klej_follows_add_bos():
    from klej.templates import encode_example
    from model import generate
    from model.args import ModelArgs
    from model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                                  vocab_size=64, sliding_window=None)).eval()
    free = list(generate(model, [1, 5, 9], 12))
    stop = free[4]
    first = free.index(stop)
    for draft_tokens in (0, 3):
        assert list(generate(model, [1, 5, 9], 12, eos_id=[63 if stop != 63 else 62, stop],
                             draft_tokens=draft_tokens)) == free[:first + 1]

    class Chars:
        bos_id, eos_id = 1, 2

        def __init__(self, add_bos):
            self.add_bos = add_bos

        def encode(self, text, bos=None, eos=None):
            return [1] * bool(self.add_bos if bos is None else bos) + [ord(c) for c in text]
    assert encode_example(["text"], ["ab"], Chars(True), 16) == [1, 97, 98]
    assert encode_example(["text"], ["ab"], Chars(False), 16) == [97, 98]

"""eval_ppl: sliding-window perplexity against naive float64 loops, bits per byte by hand, transformers on SmolLM2."""
import json
import math

import pytest
import torch

import eval_ppl
from eval_ppl import evaluate_perplexity, windows
from model.args import ModelArgs
from model.transformer import Transformer


class ByteTokenizer:
    """UTF-8 bytes as ids, BOS 256, EOS 257: a tokenizer whose behaviour the test can see at a glance."""
    bos_id, eos_id, pad_id, vocab_size, add_bos, add_eos, stop_ids = 256, 257, None, 260, True, False, (257,)

    def encode(self, text, bos=None, eos=None):
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
        return [256] * bos + list(text.encode("utf-8")) + [257] * eos

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TEXTS = ["Zażółć gęślą jaźń, rzekł Wojtek. " * 3, "Dzień dobry! 123", "ą" * 40]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=260,
                     sliding_window=None)
    return Transformer(args).eval()


def naive_nll(model, ids, ctx, stride):
    """Token by token, in float64: target t scored from the window that first reaches it, context = that window's
    tokens before t."""
    total, n = 0.0, 0
    for begin, end, first in windows(len(ids), ctx, stride):
        for t in range(first, end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:t]]))[0, -1].double()
            total -= torch.log_softmax(logits, -1)[ids[t]].item()
            n += 1
    return total, n


@pytest.mark.parametrize("ctx,stride", [(16, 8), (16, 16), (16, 1), (7, 3), (200, 50)])
def test_perplexity_equals_naive_loop(tiny, ctx, stride):
    tok = ByteTokenizer()
    r = evaluate_perplexity(tiny, tok, TEXTS, ctx=ctx, stride=stride, batch_size=3, progress=False)
    total, n = 0.0, 0
    for text in TEXTS:
        t, k = naive_nll(tiny, tok.encode(text), ctx, stride)
        total, n = total + t, n + k
    assert r.tokens == n == sum(len(t.encode()) for t in TEXTS)  # every token scored exactly once
    assert r.perplexity == pytest.approx(math.exp(total / n), rel=1e-6)


def test_windows_cover_every_target_once_with_enough_context():
    for n, ctx, stride in [(1, 4, 2), (2, 4, 2), (37, 10, 4), (37, 10, 10), (37, 10, 1), (5, 100, 7)]:
        seen = []
        for begin, end, first in windows(n, ctx, stride):
            assert end - 1 - begin <= ctx  # inputs
            seen += list(range(first, end))
            if begin > 0:  # once past the first window, at least ctx - stride tokens of context
                assert first - begin >= ctx - stride
        assert seen == list(range(1, n))


def test_stride_equal_ctx_is_disjoint_chunks(tiny):
    """stride == ctx: the model reads disjoint chunks ids[s:s+ctx], each predicting its next ctx tokens."""
    tok = ByteTokenizer()
    ids = tok.encode(TEXTS[0])
    r = evaluate_perplexity(tiny, tok, [TEXTS[0]], ctx=10, stride=10, progress=False)
    expected = 0.0
    for s in range(0, len(ids) - 1, 10):
        chunk = ids[s:s + 10]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([chunk]))[0].double(), -1)
        expected -= sum(logp[i, ids[s + i + 1]].item() for i in range(len(chunk)) if s + i + 1 < len(ids))
    assert r.tokens == len(ids) - 1
    assert r.nll == pytest.approx(expected, rel=1e-6)


def test_bits_per_byte_by_hand(tiny):
    tok = ByteTokenizer()
    text = "Łódź"  # 4 characters, 7 UTF-8 bytes (Ł, ó, ź take two each)
    r = evaluate_perplexity(tiny, tok, [text], ctx=16, stride=8, progress=False)
    ids = tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([ids]))[0].double(), -1)
    nll = -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert r.bytes == 7 and r.characters == 4
    assert r.bits_per_byte == pytest.approx(nll / math.log(2) / 7, rel=1e-6)
    assert r.bits_per_character == pytest.approx(nll / math.log(2) / 4, rel=1e-6)


def test_max_tokens_keeps_whole_documents(tiny):
    r = evaluate_perplexity(tiny, ByteTokenizer(), TEXTS, ctx=16, stride=8, max_tokens=120, progress=False)
    assert r.documents == 1 and r.tokens == len(TEXTS[0].encode())


def test_smollm2_matches_transformers_on_the_same_windows(smollm2_gguf, smollm2_hf_model):
    from model import load
    ours, tok = load(smollm2_gguf)
    hf = smollm2_hf_model
    text = ("Polecenie ls wyświetla informacje o plikach, domyślnie o bieżącym katalogu. Opcja -l używa długiego "
            "formatu listy. Żółta łódź płynęła po Wiśle, a źródło rzeki leży w Beskidach. ") * 4
    r = evaluate_perplexity(ours, tok, [text], ctx=64, stride=32, progress=False)
    ids = tok.encode(text)
    total = 0.0
    for begin, end, first in windows(len(ids), 64, 32):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        total -= sum(logp[t - begin - 1, ids[t]].item() for t in range(first, end))
    hf_ppl = math.exp(total / (len(ids) - 1))
    assert r.perplexity == pytest.approx(hf_ppl, rel=1e-3)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        eval_ppl.main(["--model", "smollm2-135m", "--data", str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        eval_ppl.main(["--model", "smollm2-135m", "--data", str(empty)])


def test_adapter_for_another_model_is_refused(tmp_path, smollm2_gguf):
    from lora import LoRAConfig, inject_lora, save_adapter
    # Same depth as SmolLM2 (30 layers), other widths: every tensor is there, none has the right shape.
    other = Transformer(ModelArgs(dim=64, n_layers=30, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                                  vocab_size=256, sliding_window=None))
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, targets=("wq",))
    inject_lora(other, cfg)
    save_adapter(other, cfg, tmp_path / "adapter")
    text = tmp_path / "t.txt"
    text.write_text("Dzień dobry, świecie.")
    with pytest.raises(ValueError, match="shape"):
        eval_ppl.main(["--model", str(smollm2_gguf), "--adapter", str(tmp_path / "adapter"), "--data", str(text)])


def test_cli_table_and_json(tmp_path, smollm2_gguf, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Dzień dobry, świecie. To jest krótki tekst po polsku, żeby policzyć perplexity.")
    rows = eval_ppl.main(["--model", str(smollm2_gguf), "--data", str(text), "--ctx", "16", "--stride", "8",
                          "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "bits/byte" in out and "SmolLM2" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["results"][0]["perplexity"] == pytest.approx(rows[0][1].perplexity)

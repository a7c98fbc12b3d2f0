"""generate.py, the command line: what it prints after the prompt, and the flags it refuses before loading a model.

The model is replaced by a scripted token stream (the decoding is what is under test); the tokenizers are a fake
one that drops a leading space on decode, as SentencePiece does, and Mistral's real SentencePiece model.
"""
from __future__ import annotations

import re

import pytest

import generate as cli


class SpaceDroppingBytes:
    """Token = one UTF-8 byte; decode drops the text's leading space, like SentencePiece's first "▁" piece."""
    bos_id, eos_id, pad_id, vocab_size, add_bos, add_eos, stop_ids = None, None, None, 256, False, False, ()

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace").removeprefix(" ")


def run_cli(monkeypatch, capsys, tokenizer, new_tokens: list[int], prompt: str) -> str:
    """stdout of `generate.py --prompt <prompt>` when the model produces `new_tokens`."""
    seen = {}

    def scripted(model, prompt_ids, max_new_tokens, *args, **kwargs):
        seen["prompt"] = prompt_ids
        yield from new_tokens
    monkeypatch.setattr(cli, "load", lambda *a, **k: (object(), tokenizer))
    monkeypatch.setattr(cli, "generate", scripted)
    cli.main(["--prompt", prompt, "--device", "cpu", "--max-new-tokens", str(len(new_tokens))])
    assert seen["prompt"] == tokenizer.encode(prompt)         # the checkpoint's own BOS convention
    return capsys.readouterr().out


def test_space_before_the_first_new_token_is_kept(monkeypatch, capsys):
    tok = SpaceDroppingBytes()
    out = run_cli(monkeypatch, capsys, tok, tok.encode(" Jan"), "Nazywam się")
    assert out == "Nazywam się Jan"


def test_last_token_ending_mid_character_is_still_printed(monkeypatch, capsys):
    tok = SpaceDroppingBytes()
    new = tok.encode(" Jan ż")[:-1]                       # "ż" is C5 BC: stop after C5
    out = run_cli(monkeypatch, capsys, tok, new, "Nazywam się")
    assert out == "Nazywam się Jan \ufffd"


def test_with_mistral_sentencepiece(monkeypatch, capsys, mistral_tokenizer_path):
    from model.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer(mistral_tokenizer_path)
    prompt, full = tok.encode("Nazywam się"), tok.encode("Nazywam się Jan 🦜")
    assert full[:len(prompt)] == prompt
    new = full[len(prompt):]                             # ▁Jan ▁ <0xF0> <0x9F> <0xA6> <0x9C>
    assert tok.decode(new).startswith("Jan")             # the bug: decoded alone, the space is gone
    assert run_cli(monkeypatch, capsys, tok, new, "Nazywam się") == "Nazywam się Jan 🦜"
    # Cut inside the emoji's 4 bytes: what was held back comes out at the end (one U+FFFD per byte here).
    out = run_cli(monkeypatch, capsys, tok, new[:-1], "Nazywam się")
    assert out.startswith("Nazywam się Jan ") and out.endswith("\ufffd")


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--draft-tokens", "-2"], "--draft-tokens must be >= 0"),
])
def test_bad_flags_are_refused_before_loading(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad flag"))
    with pytest.raises(SystemExit) as e:
        cli.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err

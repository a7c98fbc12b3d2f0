"""Tokenizers give exactly the reference ids and round-trip.

References: the `sentencepiece` package for Mistral's tokenizer.model; transformers' tokenizer built from the GGUF
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`) for the byte-level BPE, with the GGUF metadata read by the
`gguf` package, so neither side shares code with ours.

One caveat on that BPE reference: transformers' GGUF loader does not know `tokenizer.ggml.pre = "smollm"` and falls
back to GPT-2's split. SmolLM2's own tokenizer.json (and llama.cpp, which wrote the file) first cut every digit off
on its own: Digits(individual_digits=True), then ByteLevel. They differ on spaces before a digit ("a  1"). So the
reference for "smollm" is transformers' GGUF tokenizer with SmolLM2's published pre-tokenizer put back, and the
unmodified one is the reference for our "gpt2" rule.
"""
import random
import shutil
import time

import pytest
import sentencepiece

from model.tokenizer import GGUFBPETokenizer, SentencePieceTokenizer, load_tokenizer

PARAGRAPH = """\
Curie-7B to model językowy dostosowany do języka polskiego. Autorzy wzięli Mistral-7B i kontynuowali jego
pre-trening (LAPT) na 3,11 mld tokenów polskiego korpusu, trenując tylko adaptery LoRA: r=32, alpha=128.
Zażółć gęślą jaźń! ŻÓŁTA ŹDŹBŁO; Łódź, Kraków, Wrocław, Gdańsk, Poznań - 1410, 1569 i 2024-05-01 o 12:30.
Perplexity spadła z 16,49 do 9,21 -- "całkiem nieźle", powiedział ktoś z zespołu (około 2 dni na 1x RTX A6000).

We evaluate on the nine KLEJ tasks: NKJP-NER, CDSC-E, CDSC-R, CBD, PolEmo2.0-IN, PolEmo2.0-OUT, DYK, PSC, AR.
It's what they'd've called "cheap" -- they're using 8-bit AdamW, and we'll see if it's reproducible.
    Indented line with    runs   of spaces,\ttabs\t\tand trailing spaces   
\n\n\nThree blank lines above; Windows line end here:\r\nand done.
Emoji 😀👍🏽🇵🇱 and symbols: ½ ² ³ € £ ¥ © ® ™ … „cudzysłów” «guillemets» ‘quotes’ — dash – dash.
Other scripts: Привет мир, Ελληνικά, 中文字符, 日本語のテキスト, עברית, العربية ١٢٣, हिन्दी.
Kod: def f(x): return x**2 + 3.14159 * x  # komentarz; <tag attr="1">text</tag> {"json": [1, 2, 3]}
"""
TEXTS = [
    PARAGRAPH * 2,  # a few KB
    "", " ", "  ", "\n", "\n\n\n", " \n \n ", "\t", "a", "1", "12345678901234567890",
    "Zażółć gęślą jaźń", "ZAŻÓŁĆ GĘŚLĄ JAŹŃ", "   leading and trailing   ", "a  1", "x   2024 r.", "3,14 i 2,72",
    "😀", "👨‍👩‍👧‍👦 rodzina", "\u00a0nbsp\u2003em space\u3000ideographic", "e\u0301 combining accent",
    "don't DON'T it's 'S 'll 've 'd 'm 're", "<|im_start|>user\nCześć!<|im_end|>\n", "<|endoftext|>",
    "<|im_end|<|im_end|>>", "<s>not special in SentencePiece</s>",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over letters (Polish included), digits, spaces, newlines, emoji, combining marks..."""
    rng = random.Random(seed)
    alphabet = list("aąbcćdeęfghijklłmnńoóprsśtuwyzźżAĄĘŁŃÓŚŹŻQXV0123456789  \n\t\r.,;:!?'\"-()[]{}<>|/_#@") + [
        "😀", "🇵🇱", "\u00a0", "\u2003", "²", "½", "٣", "ß", "Ⅻ", "\u0301", "中", "ж", "'s", "'ll", "  ", "\n\n",
        "<|im_end|>", "<|endoftext|>", "\r\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ Mistral (SentencePiece)

@pytest.fixture(scope="module")
def mistral(mistral_tokenizer_path):
    ref = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    return SentencePieceTokenizer(mistral_tokenizer_path), ref


def test_sentencepiece_matches_reference(mistral):
    ours, ref = mistral
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_id(), ref.eos_id(), ref.get_piece_size())
    assert ours.pad_id is None and ref.pad_id() == -1
    for text in TEXTS + random_texts(200):
        ids = ref.encode(text)
        assert ours.encode(text, bos=False) == ids, repr(text)
        assert ours.encode(text) == [ref.bos_id()] + ids, repr(text)
        assert ours.encode(text, bos=True, eos=True) == [ref.bos_id()] + ids + [ref.eos_id()], repr(text)
        assert ours.decode(ours.encode(text, eos=True)) == text, repr(text)


def test_load_sentencepiece_file_and_folder(mistral_tokenizer_path, tmp_path):
    text = PARAGRAPH
    expected = SentencePieceTokenizer(mistral_tokenizer_path).encode(text)
    assert load_tokenizer(mistral_tokenizer_path).encode(text) == expected
    assert load_tokenizer("mistral-tokenizer-v1").encode(text) == expected
    for name in ("tokenizer.model", "tokenizer.model.v1"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        shutil.copy(mistral_tokenizer_path, folder / name)
        assert load_tokenizer(folder).encode(text) == expected


def test_sentencepiece_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.model.v1") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(random.Random(1).randbytes(500))
    with pytest.raises(ValueError, match="not a SentencePiece model") as err:
        load_tokenizer(tmp_path)
    assert str(junk) in str(err.value)


# ---------------------------------------------------------------------------------------- SmolLM2 (GGUF byte BPE)

@pytest.fixture(scope="module")
def smol_metadata(smollm2_gguf) -> dict:
    from gguf import GGUFReader
    reader = GGUFReader(smollm2_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}


@pytest.fixture(scope="module")
def hf_gguf(smollm2_hf_tokenizer):
    """transformers' tokenizer for the GGUF, as it builds it: GPT-2's split (conftest: built once per session)."""
    return smollm2_hf_tokenizer


@pytest.fixture(scope="module")
def hf_smollm(hf_gguf):
    """The same tokenizer (a copy of its `tokenizers` backend) with SmolLM2's published pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    backend = Tokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


@pytest.fixture(scope="module")
def smol(smol_metadata, smollm2_gguf) -> GGUFBPETokenizer:
    return GGUFBPETokenizer.from_metadata(smol_metadata, path=smollm2_gguf)


def test_gguf_bpe_matches_transformers(smol, hf_gguf, hf_smollm):
    assert smol.vocab_size == len(hf_gguf)
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (hf_gguf.bos_token_id, hf_gguf.eos_token_id,
                                                       hf_gguf.pad_token_id)
    for text in TEXTS + random_texts(300):
        ids = hf_smollm.encode(text, add_special_tokens=False).ids
        assert smol.encode(text, bos=False) == ids, repr(text)
        assert smol.encode(text, bos=True) == [hf_gguf.bos_token_id] + ids, repr(text)
        assert smol.encode(text, bos=True, eos=True) == [hf_gguf.bos_token_id] + ids + [hf_gguf.eos_token_id]


def test_gpt2_split_matches_transformers_gguf_loader(smol_metadata, hf_gguf):
    ours = GGUFBPETokenizer.from_metadata({**smol_metadata, "tokenizer.ggml.pre": "gpt2"})
    for text in TEXTS + random_texts(300, seed=1):
        assert ours.encode(text, bos=False) == hf_gguf.encode(text, add_special_tokens=False), repr(text)


def test_gguf_bpe_round_trip(smol):
    # Control tokens written in the text (<|im_end|>...) are encoded whole but, like BOS and EOS, decode to
    # nothing, so only text without them comes back.
    for text in TEXTS + random_texts(300, seed=2):
        if not any(control in text for control in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
            assert smol.decode(smol.encode(text, eos=True)) == text, repr(text)
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>", bos=False)
    assert ids[0] == smol.bos_id and ids[-1] == smol.eos_id
    assert smol.decode(ids) == "user\nhi"


def test_gguf_bpe_decode_matches_transformers(smol, hf_gguf):
    # Random ids cut characters in half too: both sides must show the broken bytes the same way (U+FFFD).
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randint(1, 20))]
        expected = hf_gguf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert smol.decode(ids) == expected, ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.decode([5, smol.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.decode([-1])


def test_gguf_bpe_drops_bytes_without_a_token(smol, hf_smollm):
    # SmolLM2 has no token for byte 0x04 (nor for lead bytes F1/F2): the references drop it, so must we.
    for text in ("a\x04b", "x\U00040000y\x13"):
        assert smol.encode(text, bos=False) == hf_smollm.encode(text, add_special_tokens=False).ids


def test_gguf_bpe_bad_metadata(smol_metadata, tmp_path):
    where = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=f"{where}.*tokenizer.ggml.model is 'llama'"):
        GGUFBPETokenizer.from_metadata({**smol_metadata, "tokenizer.ggml.model": "llama"}, path=where)
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        GGUFBPETokenizer.from_metadata({**smol_metadata, "tokenizer.ggml.pre": "qwen2"}, path=where)
    missing = {k: v for k, v in smol_metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ValueError, match=f"{where}: metadata key tokenizer.ggml.merges is missing"):
        GGUFBPETokenizer.from_metadata(missing, path=where)
    broken = {**smol_metadata, "tokenizer.ggml.merges": ["a b", "abc"]}
    with pytest.raises(ValueError, match=r"merges\[1\]"):
        GGUFBPETokenizer.from_metadata(broken, path=where)


def test_load_gguf_tokenizer(smollm2_gguf, smol):
    text = PARAGRAPH
    assert GGUFBPETokenizer.from_gguf(smollm2_gguf).encode(text) == smol.encode(text)
    assert load_tokenizer(smollm2_gguf).encode(text) == smol.encode(text)
    assert load_tokenizer("smollm2-135m").encode(text) == smol.encode(text)


def test_gguf_bpe_speed(smol_metadata):
    """Under 5 s of CPU per MB of varied Polish-like text (mostly distinct words, so BPE runs), i.e. 10 MB well
    under a minute. A fresh tokenizer, so no piece is cached yet; CPU time, so busy neighbours do not count."""
    tokenizer = GGUFBPETokenizer.from_metadata(smol_metadata)
    rng = random.Random(4)
    syllables = ["prze", "ń", "ść", "ka", "rzą", "dów", "wy", "ż", "ó", "ł", "ta", "nie", "go", "się", "stwo", "cz"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50_000)]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", ", ", ". ", "\n", " 2024 "]) for _ in range(60_000))
    start = time.process_time()
    ids = tokenizer.encode(text)
    elapsed = time.process_time() - start
    assert tokenizer.decode(ids) == text
    megabytes = len(text.encode()) / 1e6
    assert elapsed / megabytes < 5.0, f"{elapsed:.1f} s for {megabytes:.1f} MB"

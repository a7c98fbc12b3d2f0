"""A Hugging Face folder with a tokenizer.json (no tokenizer.model) loads with its own byte-level BPE tokenizer.

Oracles: transformers' AutoTokenizer on the same folder for the ids, transformers' model for the logits, and the
`tokenizers` library for tokenizer.json variants we write ourselves (Llama 3's split regex, NFC, merges as pairs).
The folder is SmolLM2 as transformers writes it: its GGUF loaded by transformers, then save_pretrained of the model
(bf16, to halve the disk) and of the tokenizer.
"""
import copy
import json
import random
import shutil

import pytest
import torch

from model import load
from model.tokenizer import ByteLevelBPETokenizer, SentencePieceTokenizer, load_tokenizer, tokenizer_from_json
from tests.test_tokenizer import TEXTS, random_texts

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

VARIED = TEXTS + [
    "Zażółć gęślą jaźń — 1234567 razy, 3,14159!", "liczby: 0 00 000 1 12 123 1234 12345 ½ ² ٣",
    "tabs\t\tand    runs   of\n\n\n   spaces   ", "emoji 😀👍🏽🇵🇱 👨‍👩‍👧‍👦",
    "<|im_start|>system\nJesteś pomocny.<|im_end|>",
    "text<|endoftext|>more text<|im_end|>", "<|im_start|><|im_start|>", "<think>nie</think>",
] + random_texts(200, seed=7)


@pytest.fixture(scope="module")
def hf_folder(smollm2_hf_model, smollm2_hf_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-hf")
    tok, gguf_model = smollm2_hf_tokenizer, smollm2_hf_model   # shared with other modules: left unchanged
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):   # a model "quantised with gguf" refuses save_pretrained
        del config.quantization_config           # (the session's oracle is read back from a plain copy: none)
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists() and (folder / "tokenizer.json").exists()
    return folder


def test_folder_loads_with_its_tokenizer_ids_and_logits_match(hf_folder):
    ours, tok = load(hf_folder)
    ref = transformers.AutoTokenizer.from_pretrained(hf_folder)
    assert isinstance(tok, ByteLevelBPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref.bos_token_id, ref.eos_token_id,
                                                                   ref.pad_token_id, len(ref))
    assert (tok.add_bos, tok.add_eos) == (False, False)      # SmolLM2: transformers adds nothing to a text
    for text in VARIED:
        assert tok.encode(text) == ref(text).input_ids, repr(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = torch.tensor([tok.encode(" ".join(VARIED[:3]))[:200]])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-3


def _variant(folder, dest, edit_json=None, config=None, generation=None):
    """A copy of the folder's tokenizer files, with tokenizer.json / tokenizer_config.json edited."""
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(folder / name, dest / name)
    spec = json.loads((dest / "tokenizer.json").read_text())
    if edit_json:
        edit_json(spec)
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    if config is not None:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    if generation is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation))
    return dest


def test_published_smollm2_pre_tokenizer_bos_settings_and_stop_ids(hf_folder, tmp_path):
    """SmolLM2 as its authors publish it: Digits(individual) then ByteLevel; here also merges as [a, b] pairs, a
    post-processor template adding BOS and EOS, and generation_config.json listing two stop ids. tokenizer_config.json
    says add_bos_token false: transformers 5 ignores that beside a tokenizer.json (the template decides), so must we."""
    def edit(spec):
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        spec["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
        spec["post_processor"] = {
            "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}},
                                                     {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                               "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}
    folder = _variant(hf_folder, tmp_path / "v", edit, config={"add_bos_token": False, "add_eos_token": False},
                      generation={"eos_token_id": [2, 0]})
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.add_bos, ours.add_eos, ours.stop_ids) == (True, True, (2, 0))
    for text in VARIED:
        expected = ref(text).input_ids
        assert expected[0] == ref.bos_token_id and expected[-1] == ref.eos_token_id
        assert ours.encode(text) == expected, repr(text)
        assert ours.encode(text, bos=False, eos=False) == expected[1:-1]


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def test_split_regex_nfc_ignore_merges_and_template_bos_as_tokenizers_runs_them(hf_folder, tmp_path):
    """Llama 3's layout on SmolLM2's vocabulary: Split(regex, Isolated) then ByteLevel without its own regex,
    ignore_merges, an NFC normaliser (Qwen2's), and BOS from the post-processor's template."""
    def edit(spec):
        spec["normalizer"] = {"type": "NFC"}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        spec["model"]["ignore_merges"] = True
        spec["post_processor"] = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                      {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}]}
    folder = _variant(hf_folder, tmp_path / "v", edit)
    ours = tokenizer_from_json(folder / "tokenizer.json")
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert (ours.add_bos, ours.add_eos, ours.bos_id) == (True, False, 1)
    rng = random.Random(8)
    texts = VARIED + ["e\u0301 \u212b \uFB01 café", "I'M HERE, it'S 12345678 words\r\n\r\n  x"] + [
        "".join(rng.choice(["ab", "Ż", "1", "22", " ", "\n", "\r", "'s", "'LL", "é", "e\u0301", "!?", "😀"])
                for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        assert ours.encode(text) == ref.encode(text).ids, repr(text)


def test_other_tokenizer_json_kinds_are_refused_and_tokenizer_model_wins(hf_folder, tmp_path,
                                                                        mistral_tokenizer_path):
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        str(wordpiece / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"wp/tokenizer\.json: its model is 'WordPiece'; only byte-level BPE"):
        load_tokenizer(wordpiece)

    def sentencepiece_style(spec):  # Mistral's tokenizer.json: Metaspace, byte_fallback, no ByteLevel
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        spec["model"]["byte_fallback"] = True
    sp_style = _variant(hf_folder, tmp_path / "sp", sentencepiece_style)
    with pytest.raises(ValueError, match=r"sp/tokenizer\.json: .*pre-tokenizer 'Metaspace' is not supported"):
        load_tokenizer(sp_style)

    def no_byte_level(spec):
        spec["pre_tokenizer"] = {"type": "Digits", "individual_digits": True}
    with pytest.raises(ValueError, match=r"SentencePiece-style BPE .*tokenizer\.model instead"):
        load_tokenizer(_variant(hf_folder, tmp_path / "nb", no_byte_level))

    both = _variant(hf_folder, tmp_path / "both")
    shutil.copy(mistral_tokenizer_path, both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)

    broken = _variant(hf_folder, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/tokenizer_config\.json: not valid JSON"):
        load_tokenizer(broken)

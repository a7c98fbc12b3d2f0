"""Input templates: Polish field labels for pairs, a leading [BOS], longest-first truncation."""
import numpy as np
import pytest

from klej.tasks import TASKS
from klej.templates import FIELD_LABELS, encode_example, render, truncate_longest_first


class CharTokenizer:
    """One id per character (its code point + 3), so expected ids can be written from the text alone."""
    bos_id, eos_id, add_bos, add_eos = 1, 2, True, False

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos


def _brute_force(lengths: list[int], budget: int) -> list[int]:
    """Cut one token at a time from the longest segment (the last one among equals)."""
    out = list(lengths)
    while sum(out) > budget:
        longest = max(out)
        out[len(out) - 1 - out[::-1].index(longest)] -= 1
    return out


@pytest.mark.parametrize("seed", range(20))
def test_truncate_longest_first_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 60, size=rng.integers(1, 5)).tolist()
    budget = int(rng.integers(0, sum(lengths) + 10))
    assert truncate_longest_first(lengths, budget) == _brute_force(lengths, budget)


def test_pair_tasks_have_polish_field_labels():
    for task in TASKS.values():
        if len(task.inputs) > 1:
            assert all(c in FIELD_LABELS for c in task.inputs)
    assert render(TASKS["cdsc-e"].inputs, ("Pies biegnie.", "Zwierzę się rusza.")) == [
        "Zdanie A: Pies biegnie.", "\nZdanie B: Zwierzę się rusza."]
    assert render(TASKS["dyk"].inputs, ("Kto?", "Ktoś.")) == ["Pytanie: Kto?", "\nOdpowiedź: Ktoś."]
    assert render(TASKS["psc"].inputs, ("Tekst długi.", "Krótko.")) == ["Tekst: Tekst długi.",
                                                                        "\nStreszczenie: Krótko."]


def test_single_text_follows_bos():
    tok = CharTokenizer()
    ids = encode_example(("sentence",), ("Zażółć gęślą jaźń",), tok, max_len=64)
    assert ids == [1] + [ord(c) + 3 for c in "Zażółć gęślą jaźń"]
    assert encode_example(("sentence",), ("Zażółć gęślą jaźń",), tok, max_len=7) == ids[:7]


def test_long_pair_is_cut_from_the_longest_field_and_keeps_both_labels():
    tok = CharTokenizer()
    extract, summary = "Bardzo długi tekst artykułu prasowego. " * 5, "Krótkie streszczenie."
    ids = encode_example(TASKS["psc"].inputs, (extract, summary), tok, max_len=80)
    assert len(ids) == 80 and ids[0] == 1
    text = "".join(chr(i - 3) for i in ids[1:])
    second = "\nStreszczenie: " + summary
    assert text.endswith(second)                           # the short field survives whole
    assert text == ("Tekst: " + extract)[:79 - len(second)] + second


def test_max_len_too_small_is_refused():
    with pytest.raises(ValueError, match="max_len=2"):
        encode_example(TASKS["cdsc-e"].inputs, ("a", "b"), CharTokenizer(), max_len=2)

"""From an example's fields to the token ids the classifier reads.

A single-text task feeds its text as it is. A pair task (CDSC, DYK, PSC) joins its two fields on separate lines,
each after a Polish field label, so the decoder can tell where one ends and the next begins:

    Zdanie A: Chłopiec w czerwonej koszulce gra w piłkę.
    Zdanie B: Dziecko gra w piłkę.

Every input starts with [BOS] when the checkpoint's tokenizer adds one (`tokenizer.add_bos`: Mistral yes, SmolLM2
no), as in pre-training, and ends with its own last token: the classifier reads the
hidden state there (klej/head.py), the one position that has attended to the whole input and whose state the
language model built to predict what comes next, i.e. a summary of the text so far. (An [EOS] appended to every
input would make the pooled token the same for all inputs, and its state mostly "a new document starts here":
in our probes on SmolLM2 it classified worse than the last text token.) Hugging Face's sequence classifiers pool
the same position for Mistral, whose tokenizer adds [BOS] but no [EOS].

Too-long inputs are cut longest-first, from the end of the longest field (PSC's extracts run to hundreds of tokens,
its summaries are short), and each field keeps its label, which starts it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

FIELD_LABELS: dict[str, str] = {
    "sentence_A": "Zdanie A",        # CDSC-E, CDSC-R
    "sentence_B": "Zdanie B",
    "question": "Pytanie",           # DYK
    "answer": "Odpowiedź",
    "extract_text": "Tekst",         # PSC
    "summary_text": "Streszczenie",
}


class Tokenizer(Protocol):
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]: ...


def render(columns: Sequence[str], fields: Sequence[str]) -> list[str]:
    """The text segments of one example: the field itself for a single-text task, "Label: value" lines for a pair."""
    if len(columns) == 1:
        return [fields[0]]
    return [("\n" if i else "") + f"{FIELD_LABELS[c]}: {value}" for i, (c, value) in enumerate(zip(columns, fields))]


def truncate_longest_first(lengths: Sequence[int], budget: int) -> list[int]:
    """New lengths with sum <= budget, taken from the longest segments first (the shortest keep all they can).

    Water-filling: find the largest cap c with sum(min(length, c)) <= budget; segments longer than c are cut to c,
    and the tokens left over go one each to the first of the cut segments.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    cap, spent = 0, 0
    remaining = len(lengths)
    for length in sorted(lengths):
        # Raising the cap from `cap` to `length` costs one token per segment still longer than `cap`.
        if spent + (length - cap) * remaining > budget:
            break
        spent += (length - cap) * remaining
        cap = length
        remaining -= 1
    cap += (budget - spent) // remaining
    spare = budget - sum(min(length, cap) for length in lengths)
    out = []
    for length in lengths:
        if length > cap and spare > 0:
            out.append(cap + 1)
            spare -= 1
        else:
            out.append(min(length, cap))
    return out


def encode_example(columns: Sequence[str], fields: Sequence[str], tokenizer: Tokenizer, max_len: int) -> list[int]:
    """[BOS] (where the tokenizer adds one) + segments (truncated longest-first to fit), at most max_len ids."""
    ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    if max_len < len(ids) + len(columns):
        raise ValueError(f"max_len={max_len} leaves no room for {len(columns)} field(s)" + (" after BOS" * len(ids)))
    segments = [tokenizer.encode(text, bos=False, eos=False) for text in render(columns, fields)]
    lengths = truncate_longest_first([len(s) for s in segments], max_len - len(ids))
    for segment, n in zip(segments, lengths):
        ids += segment[:n]
    return ids

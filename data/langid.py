"""Is this paragraph Polish? A small, transparent scorer that keeps English out of the Polish corpus.

Debian's Polish documentation is translated piece by piece, so many paragraphs in a "Polish" man page or help page
are still the English original (an option the translators have not reached yet, a licence notice, a code comment).
Training Polish LAPT on them would teach the model English, so the corpus builder drops every paragraph that this
scorer calls English. A trained classifier would be more accurate on hard cases, but our cases are easy (whole
paragraphs of one language or the other) and a reader can check this one by hand:

    polish_score = share of words that are Polish function words
                 + DIACRITIC_WEIGHT * share of letters that are Polish diacritics (ą ć ę ł ń ó ś ź ż)
                 - share of words that are English function words

Function words ("w", "się", "jest" / "the", "of", "is") make up a large and steady part of any running prose in
either language (roughly a fifth to a third of the words) and say nothing about the topic, so one paragraph of
either language scores clearly on its own side. Words that are function words in both languages ("a", "i", "to",
"on", "do", "no", "we", "by", "go", "one", "ten") are in neither list. Diacritics cover Polish prose that happens to use
few listed words: they are about 6% of the letters of Polish prose and essentially absent from English, and
DIACRITIC_WEIGHT = 3 makes that worth about as much as the Polish function-word rate (about 0.2; both measured on
our corpus).

A paragraph with no evidence either way (numbers, code, a lone name) scores 0 and is not Polish.
"""
from __future__ import annotations

import re

POLISH_FUNCTION_WORDS = frozenset("""
    w z ze na o u ku od po dla przez przy nad pod przed między bez oraz lub albo czy ale lecz jednak więc także
    też również jeszcze nawet tylko już tak jak niż jeśli jeżeli gdy kiedy aby żeby gdzie dlaczego ponieważ że
    się nie jest są był była było były być będzie można należy może musi został została zostało zostaną
    jego jej ich mnie mi mu sobie siebie ta te tę tu tam tym tego tej tych który która które którego której
    których którym co każdy każda każde wszystkie wszystkich inne innych bardzo
    sie juz moze bedzie tez ktory ktora ktore jesli
""".split())  # the last line: the same words typed without diacritics, as in old e-mail and IRC (fortunes-pl)

ENGLISH_FUNCTION_WORDS = frozenset("""
    the of and or but not is are was were be been being have has had does did will would can could should must
    may might for with from in at into about than then also only such each other more most some any all this
    that these those it its you your he she his her they their there which who what when where how if
""".split())

POLISH_DIACRITICS = frozenset("ąćęłńóśźż")
DIACRITIC_WEIGHT = 3.0

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any alphabet


def polish_score(text: str) -> float:
    """Positive for Polish, negative for English, 0 when the text holds no evidence (see the module docstring)."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    n_letters = sum(len(w) for w in words)
    polish_words = sum(w in POLISH_FUNCTION_WORDS for w in words) / len(words)
    english_words = sum(w in ENGLISH_FUNCTION_WORDS for w in words) / len(words)
    diacritics = sum(c in POLISH_DIACRITICS for w in words for c in w) / n_letters
    return polish_words + DIACRITIC_WEIGHT * diacritics - english_words


def is_polish(text: str) -> bool:
    return polish_score(text) > 0.0

"""experiments/lapt_report.py end to end at toy scale: real SmolLM2 weights, the real corpus (a 300-document slice for
training), 4 LAPT steps of 2 x 64 tokens. Checks that every table and figure of the page is produced, that LAPT
lowered Polish perplexity on both Polish sets (it can fail: a training loop that does not learn, an adapter that is
not loaded back before evaluating, or evaluation of the wrong model all leave it unchanged or higher), and that a
rerun takes every run from the cache.
"""
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from experiments import lapt_report
from experiments.svg import nice_ticks


def test_bootstrap_interval_against_direct_resampling():
    """The vectorised bootstrap = resampling with a loop (the same draws), and it covers the observed mean."""
    rng = np.random.default_rng(1)
    correct = (rng.random((2, 50)) < 0.7).astype(float)
    lo, hi = lapt_report.bootstrap_accuracy(correct, 300, seed=5)
    draws = np.random.default_rng(5).integers(0, 50, size=(300, 50))
    means = [np.mean([row[d].mean() for row in correct]) for d in draws]
    assert (lo, hi) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)), rel=1e-12)
    assert lo < correct.mean() < hi


def test_first_words_cuts_at_a_space_within_the_budget():
    text = "Ala ma kota, a kot ma Alę."
    assert lapt_report.first_words(text, 100) == text
    assert lapt_report.first_words(text, 12) == "Ala ma kota,"      # the space right after the budget's last char
    assert lapt_report.first_words(text, 11) == "Ala ma"
    assert lapt_report.first_words("Bezspacji", 4) == "Bezs"          # no space at all: cut at the budget


def test_each_mode_writes_its_own_page_by_default():
    """`--quick` (or the test's toy run) without --out must not overwrite the committed full page."""
    folders = [lapt_report.DEFAULT_OUT[m] for m in lapt_report.MODES]
    assert len(set(folders)) == len(folders)
    assert lapt_report.DEFAULT_OUT["full"] == lapt_report.ROOT / "docs"


def test_nice_ticks_cover_the_range():
    for lo, hi in ((0.83, 2.41), (12.0, 25.8), (0, 1000), (5, 5)):
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12


@pytest.mark.slow
def test_toy_report(tmp_path):
    argv = ["--toy", "--out", str(tmp_path / "docs"), "--root", str(tmp_path / "runs")]
    first = lapt_report.main(argv)
    page = (tmp_path / "docs" / "results.md").read_text()
    mode = lapt_report.MODES["toy"]

    for heading in ("## 1. The LAPT curve", "## 2. Forgetting", "## 3. Downstream", "## 4. NF4"):
        assert heading in page
    figures = re.findall(r"!\[[^\]]*\]\((results/[\w.-]+\.svg)\)", page)
    assert len(figures) == 6 and len(set(figures)) == 6
    for figure in figures:
        svg = ET.parse(tmp_path / "docs" / figure).getroot()
        assert svg.tag.endswith("svg")
        drawn = [e for e in svg.iter() if e.tag.rsplit("}", 1)[-1] in ("polyline", "rect")]
        assert len(drawn) >= 2, f"{figure}: nothing drawn beyond the background"
    # The tables: the curve (and forgetting) have a row per point, NF4 two rows per point, the rank table one per rank.
    rows = {n: len(re.findall(rf"^\| {n} \| [\d,]+ \|", page, flags=re.MULTILINE)) for n in mode.points}
    assert all(count >= 2 for count in rows.values()), rows
    assert len(re.findall(r"^\| (float32|NF4) \| ", page, flags=re.MULTILINE)) == 2 * (1 + len(mode.nf4_points))
    assert len(re.findall(r"^\| (8|32|128) \| [\d,]+ \| ", page, flags=re.MULTILINE)) == len(mode.ranks)
    assert len(re.findall(r"^\| (base|LAPT-merged) \| 0 \| ", page, flags=re.MULTILINE)) == 2
    assert len(re.findall(r"^\| \d+( \(the curve\))? \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", page, flags=re.MULTILINE)) \
        == 1 + len(mode.spread_seeds)
    for needed in ("| command |", "| commit |", "| machine |", "| wall time |"):
        assert needed in page

    results = first["results"]
    curve = results["curve"]
    assert [p["step"] for p in curve] == list(mode.points)
    for name in ("pl-test", "pl-fortunes"):
        before, after = (curve[0]["eval"][name]["perplexity"], curve[-1]["eval"][name]["perplexity"])
        assert after < before, f"{name}: perplexity {before:.3f} before LAPT, {after:.3f} after"
    ranks = results["ranks"]
    assert ranks[8]["trainable"] < ranks[32]["trainable"] < ranks[128]["trainable"]
    assert ranks[32]["eval"] == curve[1]["eval"]  # rank 32 at step 2 is the curve's own point: the same run, cached
    spread = results["spread"]
    assert spread[lapt_report.SEED] is ranks[32] and len(spread) == 1 + len(mode.spread_seeds)
    for seed in mode.spread_seeds:  # another seed trains another run (the seed reaches train.py)
        assert spread[seed]["eval"]["pl-test"]["perplexity"] != ranks[32]["eval"]["pl-test"]["perplexity"]

    again = lapt_report.main(argv)
    assert again["cache"] == {"hits": first["cache"]["hits"] + first["cache"]["misses"], "misses": 0}

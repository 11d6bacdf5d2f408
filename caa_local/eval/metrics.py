"""Judge-free metrics for open-ended answers, and a fluency guard.

Behavior metrics (higher = more of the behavior):
- ``sentiment``: VADER compound score (-1..1), averaged over sentences, as VADER's authors
  advise for text longer than a sentence (one compound for a paragraph saturates near +-1).
- ``formality``: a lexical approximation of Heylighen & Dewaele's (2002) F-score,
  F = 50 * (1 + (formal - deictic) / words), 0..100. Their formal classes are nouns,
  adjectives, prepositions and articles; the deictic ones pronouns, verbs, adverbs and
  interjections. Without a POS tagger we count the closed classes exactly (articles,
  prepositions; pronouns, interjections), nouns and adjectives by derivational suffix
  (-tion, -ment, -ness, -ity, -ous, -al, ...), and add what the F-score misses in chat text:
  contractions, slang and exclamation marks as deictic, formal connectives as formal.
- ``enthusiasm``: per sentence, exclamation marks plus words from an intensifier /
  excitement lexicon (amazing, absolutely, so, wow, ...) plus all-caps words.
- ``length``: words.
Fluency: ``distinct_2`` (unique / all word bigrams), ``repetition`` (share of 4-grams that
repeat an earlier one), ``degenerate`` (empty, > 50 % repeated 4-grams, or one token
repeated); the unsteered model's perplexity of a steered answer is ``caa_local.engine.scoring.perplexity``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*|[^\w\s]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")

ARTICLES = frozenset("a an the".split())
PREPOSITIONS = frozenset(
    "about above across after against along among around at before behind below beneath beside "
    "between beyond by concerning despite during except for from in inside into like near of off "
    "on onto out outside over per regarding since through throughout toward towards under "
    "underneath until upon with within without via".split()
)
PRONOUNS = frozenset(
    "i me my mine myself you your yours yourself yourselves we us our ours ourselves he him his "
    "himself she her hers herself it its itself they them their theirs themselves this that "
    "these those".split()
)
INTERJECTIONS = frozenset("oh wow hey hi yeah yep nope ok okay um uh ah haha lol omg yay ugh whoa hmm".split())
SLANG = frozenset(
    "gonna wanna gotta kinda sorta ya y'all dude guys stuff cool awesome super totally pretty "
    "basically literally stuff chill vibe vibes nah yup btw tbh lots".split()
)
FORMAL_CONNECTIVES = frozenset(
    "however therefore moreover furthermore consequently nevertheless thus hence accordingly "
    "whereas additionally notwithstanding subsequently respectively regarding herein".split()
)
_FORMAL_SUFFIX = re.compile(r"[a-z]{3,}(?:tion|sion|ment|ness|ity|ance|ence|ism|ous|ive|ful|able|ible|ical|al)s?$")
INTENSIFIERS = frozenset(
    "amazing awesome incredible incredibly fantastic wonderful wonderfully absolutely totally "
    "so really truly super thrilled excited exciting exhilarating love loved adore best great "
    "brilliant delighted delightful extremely wow yay hooray epic spectacular marvelous "
    "marvellous stunning unbelievable ecstatic overjoyed thrilling".split()
)


def tokens(text: str) -> list[str]:
    """Lower-case words (with their contractions) and punctuation marks."""
    return _TOKEN.findall(text.lower())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s]


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """Mean VADER compound over sentences, -1 (negative) .. 1 (positive); 0 for empty text."""
    parts = sentences(text)
    if not parts:
        return 0.0
    return float(np.mean([_vader().polarity_scores(s)["compound"] for s in parts]))


def formality(text: str) -> float:
    """Lexical F-score 0..100 (50 = balanced); see the module docstring."""
    ws = words(text)
    if not ws:
        return 50.0
    formal = deictic = 0
    for w in ws:
        if w in ARTICLES or w in PREPOSITIONS or w in FORMAL_CONNECTIVES or _FORMAL_SUFFIX.match(w):
            formal += 1
        elif w in PRONOUNS or w in INTERJECTIONS or w in SLANG or "'" in w or "’" in w:
            deictic += 1
    deictic += text.count("!")
    return 50.0 * (1.0 + max(-1.0, min(1.0, (formal - deictic) / len(ws))))


def enthusiasm(text: str) -> float:
    """(exclamation marks + intensifier words + all-caps words) per sentence."""
    n_sentences = max(len(sentences(text)), 1)
    caps = sum(1 for w in _WORD.findall(text) if len(w) >= 3 and w.isupper())
    hits = sum(1 for w in words(text) if w in INTENSIFIERS)
    return (text.count("!") + hits + caps) / n_sentences


def length(text: str) -> float:
    return float(len(words(text)))


def _ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def distinct_2(text: str) -> float:
    """Unique bigrams / all bigrams (1.0 for texts too short to repeat one)."""
    grams = _ngrams(tokens(text), 2)
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition(text: str) -> float:
    """Share of 4-grams that repeat an earlier 4-gram (0 = none, -> 1 = a loop)."""
    grams = _ngrams(tokens(text), 4)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate(text: str) -> bool:
    """Empty, mostly repeated 4-grams, or one token over and over ("the the the", "!!!!")."""
    toks = tokens(text)
    if not toks:
        return True
    if repetition(text) > 0.5:
        return True
    if len(toks) >= 4 and len(set(toks)) == 1:
        return True
    run = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        if run >= 8:
            return True
    return re.search(r"(.)\1{19,}", text) is not None


METRICS: dict[str, Callable[[str], float]] = {
    "sentiment": sentiment,
    "formality": formality,
    "enthusiasm": enthusiasm,
    "length": length,
    "distinct_2": distinct_2,
    "repetition": repetition,
}
FLUENCY = ("distinct_2", "repetition")


def summarize(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per multiplier: the mean of each metric, the fluency guard and the degenerate share.

    Rows need "multiplier" and "answer"; their "perplexity" values, when present, are
    summarized by the median (a few broken answers have huge perplexities).
    """
    out = []
    for mult in sorted({r["multiplier"] for r in rows}):
        group = [r for r in rows if r["multiplier"] == mult]
        answers = [r["answer"] for r in group]
        summary: dict[str, Any] = {"multiplier": mult, "n": len(group)}
        for name in dict.fromkeys([*names, *FLUENCY]):
            summary[name] = float(np.mean([METRICS[name](a) for a in answers]))
        summary["degenerate"] = float(np.mean([degenerate(a) for a in answers]))
        ppl = [r["perplexity"] for r in group if isinstance(r.get("perplexity"), float) and math.isfinite(r["perplexity"])]
        if ppl:
            summary["perplexity"] = float(np.median(ppl))
        out.append(summary)
    return out

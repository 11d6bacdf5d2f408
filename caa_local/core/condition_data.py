"""Condition datasets: prompts that have a condition and prompts that lack it (CAST).

Sources, as ``caa-local condition extract`` takes them:

- one ``NAME`` or ``FILE.json``: a packaged condition (``caa_local/data/conditions/NAME.json``)
  or a file of the same shape, ``{"matching": [prompt, ...], "not_matching": [prompt, ...]}``;
- two sources ``POS NEG``: each a JSON list of prompts (strings, or objects with a
  ``"question"``), an A/B file, or the name of an A/B behavior (the paper's or a demo one),
  whose questions, without their choices, are the prompts. Two of the paper's behaviors are
  two topics, which gives a condition to check on any model.

Each side is split with a seed into train (extraction), val (choosing the method, the layer
and the threshold) and test (the F1 reported), 60/20/20.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caa_local.core.datasets import DATA_DIR, behavior_names, load_ab
from caa_local.core.errors import DatasetError

CONDITIONS_DIR = DATA_DIR / "conditions"
PARTS = ("train", "val", "test", "all")
FRACTIONS = (0.6, 0.2, 0.2)
MAX_PROMPT_CHARS = 4000
_CHOICES = re.compile(r"\n\s*(Choices:|\(A\))")


@dataclass(frozen=True)
class ConditionData:
    """Prompts with (``matching``) and without (``not_matching``) the condition."""

    name: str
    source: str  # how to load it again: "work", or "a.json,b.json", or "myopic-reward,refusal"
    sha256: str
    matching: tuple[str, ...]
    not_matching: tuple[str, ...]

    def part(self, part: str, seed: int = 0) -> tuple[list[str], list[str]]:
        """(matching, not matching) prompts of one part: train, val, test or all."""
        return split_prompts(self.matching, part, seed), split_prompts(self.not_matching, part, seed)


def condition_names() -> list[str]:
    return sorted(p.stem for p in CONDITIONS_DIR.glob("*.json"))


def split_prompts(prompts: Sequence[str], part: str, seed: int = 0) -> list[str]:
    """A seeded 60/20/20 split into train, val and test (disjoint; file order kept)."""
    if part not in PARTS:
        raise DatasetError(f"split part {part!r}: expected one of {', '.join(PARTS)}")
    prompts = list(prompts)
    if part == "all":
        return prompts
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_train = round(len(prompts) * FRACTIONS[0])
    n_val = round(len(prompts) * FRACTIONS[1])
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(prompts))}
    lo, hi = bounds[part]
    chosen = set(order[lo:hi])
    return [p for i, p in enumerate(prompts) if i in chosen]


def _prompts(where: str, data: Any) -> list[str]:
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{where}: expected a non-empty list of prompts")
    out = []
    for i, item in enumerate(data):
        text = item.get("question") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}[{i}]: expected a non-empty string (or an object with a 'question')")
        if len(text) > MAX_PROMPT_CHARS:
            raise DatasetError(f"{where}[{i}]: prompt of {len(text)} characters (at most {MAX_PROMPT_CHARS})")
        out.append(text.strip())
    return out


def _read(path: Path) -> tuple[Any, bytes]:
    try:
        raw = path.read_bytes()
        return json.loads(raw.decode("utf-8")), raw
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def question_stem(question: str) -> str:
    """An A/B question without its listed choices."""
    return _CHOICES.split(question, maxsplit=1)[0].strip()


def _side(source: str) -> tuple[str, list[str], bytes]:
    """(name, prompts, bytes hashed) of one side: a prompt list file, an A/B file or a behavior."""
    path = Path(source).expanduser()
    if path.suffix == ".json" or path.exists():
        data, raw = _read(path)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "answer_matching_behavior" in data[0]:
            return path.stem, [question_stem(i.question) for i in load_ab(path).items], raw
        return path.stem, _prompts(str(path), data), raw
    if source in behavior_names():
        ab = load_ab(source)
        return source, [question_stem(i.question) for i in ab.items], ab.sha256.encode()
    raise DatasetError(f"{source}: not a JSON file nor a behavior (behaviors: {', '.join(behavior_names())})")


def load_condition_data(sources: Sequence[str], limit: int | None = None) -> ConditionData:
    """Condition prompts from one or two sources (see the module docstring); ``limit``: at most
    that many prompts per side (the first ones, before the split)."""
    if len(sources) == 1:
        source = sources[0]
        path = Path(source).expanduser()
        if not (path.suffix == ".json" or path.exists()):
            path = CONDITIONS_DIR / f"{source}.json"
            if not path.is_file():
                raise DatasetError(f"{source}: no such condition (packaged: {', '.join(condition_names())}; "
                                   "or give FILE.json, or POS NEG)")
        data, raw = _read(path)
        if not isinstance(data, dict) or "matching" not in data or "not_matching" not in data:
            raise DatasetError(f"{path}: expected an object with 'matching' and 'not_matching' prompt lists "
                               "(or pass two files: POS NEG)")
        name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else path.stem
        pos, neg = _prompts(f"{path}: matching", data["matching"]), _prompts(f"{path}: not_matching", data["not_matching"])
        digest = hashlib.sha256(raw).hexdigest()
    elif len(sources) == 2:
        (pos_name, pos, pos_raw), (neg_name, neg, neg_raw) = _side(sources[0]), _side(sources[1])
        name = f"{pos_name}-vs-{neg_name}"
        digest = hashlib.sha256(pos_raw + b"\0" + neg_raw).hexdigest()
    else:
        raise DatasetError(f"expected one condition dataset or two prompt sources (POS NEG), got {len(sources)}")
    if limit is not None:
        pos, neg = pos[:limit], neg[:limit]
    overlap = set(pos) & set(neg)
    if overlap:
        raise DatasetError(f"{name}: {len(overlap)} prompts are on both sides, e.g. {sorted(overlap)[0]!r}")
    for side, prompts in (("matching", pos), ("not_matching", neg)):
        if len(prompts) < 5:
            raise DatasetError(f"{name}: {len(prompts)} {side} prompts; a condition needs at least 5 a side "
                               "(train, val and test each get some)")
    return ConditionData(name, ",".join(sources), digest, tuple(pos), tuple(neg))

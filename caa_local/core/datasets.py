"""A/B, open-ended and capability datasets: the CAA paper's, the demo ones, or the user's.

A/B files use the paper's format (github.com/nrimsky/CAA): a JSON list of
``{"question", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}``,
where the question already lists the choices. Every problem raises one ``DatasetError``
naming the file, the item index and what is wrong.
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

from caa_local.core.errors import DatasetError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PAPER_DIR = DATA_DIR / "caa"
DEMO_DIR = DATA_DIR / "demo"

PAPER_BEHAVIORS: tuple[str, ...] = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "survival-instinct",
    "sycophancy",
    "refusal",
)
DEMO_BEHAVIORS: tuple[str, ...] = ("sentiment", "formality", "enthusiasm")
CAPABILITY_FILES: dict[str, str] = {"mmlu": "mmlu/mmlu.json", "truthfulqa": "truthfulqa/truthful_qa.json"}

_KIND_FILES = {"generate": "generate_dataset.json", "test": "test_dataset_ab.json",
               "open_ended": "test_dataset_open_ended.json"}
_ANSWER = re.compile(r"\s*\(([A-H])\)\s*")
_AB_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
_CAP_KEYS = ("prompt", "correct", "incorrect", "category")


def _letter(answer: str) -> str:
    match = _ANSWER.fullmatch(answer)
    if match is None:
        raise DatasetError(f'answer {answer!r}: expected "(X)" with X in A-H')
    return match.group(1)


@dataclass(frozen=True)
class ABItem:
    """One A/B question; ``matching``/``not_matching`` are normalised to "(X)"."""

    question: str
    matching: str
    not_matching: str

    @property
    def matching_letter(self) -> str:
        return _letter(self.matching)

    @property
    def not_matching_letter(self) -> str:
        return _letter(self.not_matching)


@dataclass(frozen=True)
class ABDataset:
    name: str
    path: Path
    sha256: str
    items: tuple[ABItem, ...]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class CapabilityItem:
    """An MMLU / TruthfulQA question as A/B: ``correct``/``incorrect`` like "(A)"."""

    prompt: str
    correct: str
    incorrect: str
    category: str


def behavior_names() -> list[str]:
    """Every packaged behavior: the paper's seven, then the demo ones."""
    return [*PAPER_BEHAVIORS, *DEMO_BEHAVIORS]


def dataset_path(name_or_path: str | Path, kind: str = "generate") -> Path:
    """The file for a packaged behavior name, a behavior directory, or a JSON file path."""
    if kind not in _KIND_FILES:
        raise DatasetError(f"dataset kind {kind!r}: expected one of {', '.join(_KIND_FILES)}")
    name = str(name_or_path)
    if name in PAPER_BEHAVIORS:
        return PAPER_DIR / name / _KIND_FILES[kind]
    if name in DEMO_BEHAVIORS:
        return DEMO_DIR / name / _KIND_FILES[kind]
    path = Path(name).expanduser()
    if path.is_dir():
        return path / _KIND_FILES[kind]
    if isinstance(name_or_path, Path) or path.suffix == ".json" or "/" in name or path.exists():
        return path
    raise DatasetError(
        f"unknown dataset {name!r}: expected a behavior name ({', '.join(behavior_names())}) "
        "or a path to a .json file"
    )


def _read_json(path: Path) -> tuple[Any, str]:
    """Parsed JSON and the sha256 of the file bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such dataset file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DatasetError(f"{path}: malformed JSON at {where}: {exc.msg}") from None
    return data, hashlib.sha256(raw).hexdigest()


def _items(path: Path, data: Any, keys: Sequence[str]) -> list[dict[str, str]]:
    """Check the list-of-objects shape and that ``keys`` are non-empty strings."""
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of items at the top level, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{path}: the list is empty, expected at least one item")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DatasetError(
                f"{path}: item {i}: expected an object with keys {', '.join(keys)}, got {type(item).__name__}"
            )
        for key in keys:
            if key not in item:
                raise DatasetError(f"{path}: item {i}: missing key {key!r}")
            if not isinstance(item[key], str):
                raise DatasetError(
                    f"{path}: item {i}: {key!r} must be a string, got {type(item[key]).__name__}"
                )
            if not item[key].strip():
                raise DatasetError(f"{path}: item {i}: {key!r} is empty")
    return data


def _pair(path: Path, i: int, text: str, first: tuple[str, str], second: tuple[str, str]) -> tuple[str, str]:
    """Normalise two "(X)" answers; they must differ and appear in ``text`` as choices."""
    out = []
    for key, answer in (first, second):
        match = _ANSWER.fullmatch(answer)
        if match is None:
            raise DatasetError(
                f'{path}: item {i}: {key} must be "(X)" with X in A-H, got {answer!r}'
            )
        out.append(f"({match.group(1)})")
    if out[0] == out[1]:
        raise DatasetError(f"{path}: item {i}: {first[0]} and {second[0]} are both {out[0]} (they must differ)")
    for (key, _), answer in zip((first, second), out):
        if answer not in text:
            raise DatasetError(f"{path}: item {i}: {key} is {answer} but the question has no choice {answer}")
    return out[0], out[1]


def _name_of(path: Path) -> str:
    return path.parent.name if path.name in _KIND_FILES.values() else path.stem


def load_ab(name_or_path: str | Path, kind: str = "generate") -> ABDataset:
    """Load and validate an A/B dataset (a behavior name or a path).

    ``kind`` picks a behavior's file: "generate" (extraction data) or "test" (the paper's
    held-out A/B test set); a path is read as it is.
    """
    path = dataset_path(name_or_path, kind)
    data, sha = _read_json(path)
    seen: dict[tuple[str, str, str], int] = {}
    items = []
    for i, raw in enumerate(_items(path, data, _AB_KEYS)):
        question = raw["question"]
        matching, not_matching = _pair(
            path,
            i,
            question,
            ("answer_matching_behavior", raw["answer_matching_behavior"]),
            ("answer_not_matching_behavior", raw["answer_not_matching_behavior"]),
        )
        key = (question, matching, not_matching)
        if key in seen:
            raise DatasetError(f"{path}: items {seen[key]} and {i} are duplicates (same question and answers)")
        seen[key] = i
        items.append(ABItem(question, matching, not_matching))
    return ABDataset(_name_of(path), path, sha, tuple(items))


def load_open_ended(name_or_path: str | Path) -> list[str]:
    """The questions of an open-ended file (a list of objects with key "question")."""
    path = dataset_path(name_or_path, "open_ended")
    data, _ = _read_json(path)
    return [item["question"] for item in _items(path, data, ("question",))]


def load_capability(name: str | Path) -> list[CapabilityItem]:
    """The packaged "mmlu" (570) or "truthfulqa" (817) A/B sets, or a file of that format."""
    key = str(name)
    if key in CAPABILITY_FILES:
        path = PAPER_DIR / CAPABILITY_FILES[key]
    elif isinstance(name, Path) or key.endswith(".json") or "/" in key:
        path = Path(key).expanduser()
    else:
        raise DatasetError(f"unknown capability dataset {key!r}: expected one of {', '.join(CAPABILITY_FILES)}")
    data, _ = _read_json(path)
    out = []
    for i, raw in enumerate(_items(path, data, _CAP_KEYS)):
        correct, incorrect = _pair(
            path, i, raw["prompt"], ("correct", raw["correct"]), ("incorrect", raw["incorrect"])
        )
        out.append(CapabilityItem(raw["prompt"], correct, incorrect, raw["category"]))
    return out


def load_protocol() -> dict[str, Any]:
    """The paper's evaluation protocol (system prompts per behavior, judge instructions)."""
    data, _ = _read_json(PAPER_DIR / "protocol.json")
    if not isinstance(data, dict) or not {"system_prompts", "judge"} <= data.keys():
        raise DatasetError(f"{PAPER_DIR / 'protocol.json'}: expected keys system_prompts and judge")
    return data


def has_test_set(name: str | Path) -> bool:
    """Whether ``name`` is a packaged behavior with the paper's held-out A/B test set."""
    return str(name) in PAPER_BEHAVIORS and dataset_path(str(name), "test").is_file()


@dataclass(frozen=True)
class EvalSet:
    """The questions an evaluation uses, and which they are: every result records name/split/n.

    ``split`` is "test" (the paper's held-out test_dataset_ab.json), "val"/"train" (the seeded
    split of generate_dataset.json or of a file) or "all" (a file evaluated whole).
    """

    name: str
    split: str
    items: tuple[ABItem, ...]
    path: Path
    sha256: str

    @property
    def n(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "n": self.n, "dataset_path": str(self.path),
                "dataset_sha256": self.sha256}

    def label(self) -> str:
        return f"{self.name} ({self.split}, n={self.n})"


def eval_set(dataset: str | Path, part: str | None = None, limit: int | None = None) -> EvalSet:
    """The questions to evaluate ``dataset`` on, as the paper splits its data.

    With ``part`` None: a paper behavior gives its held-out test set (split "test"); any
    other behavior or a FILE is evaluated whole ("all"; a demo behavior has no test set, so
    its validation split is used). "val"/"train" take the seeded split of the behavior's
    generate_dataset.json (or of the file): choose layers on "val", report on "test".
    """
    if part not in (None, "test", "val", "train", "all"):
        raise DatasetError(f"split {part!r}: expected test, val, train or all")
    name = str(dataset)
    if part == "test" or (part is None and has_test_set(name)):
        if not has_test_set(name):
            raise DatasetError(
                f"{name}: only the paper's behaviors ({', '.join(PAPER_BEHAVIORS)}) have a test set; "
                "use --split val|train|all"
            )
        data, chosen = load_ab(name, "test"), "test"
    else:
        data = load_ab(name)
        if part is None:
            part = "val" if name in DEMO_BEHAVIORS else "all"
        chosen = part
    items = tuple(split(data.items, chosen) if chosen in ("val", "train") else data.items)[: limit or None]
    if not items:
        raise DatasetError(f"{data.path}: no questions in the {chosen!r} part")
    return EvalSet(data.name, chosen, items, data.path, data.sha256)


def split(items: Sequence[ABItem], part: str, val_fraction: float = 0.2, seed: int = 0) -> list[ABItem]:
    """A seeded train/val split, stratified by matching letter; items keep their file order.

    "train" and "val" are disjoint and together give "all". With 2 or more items and
    0 < val_fraction < 1, both parts are non-empty.
    """
    if part not in ("train", "val", "all"):
        raise DatasetError(f"split part {part!r}: expected train, val or all")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
    items = list(items)
    if part == "all":
        return items
    n = len(items)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    groups: dict[str, list[int]] = {}
    for index in order:
        groups.setdefault(items[index].matching_letter, []).append(index)
    # Systematic stratified sample: position k of a group of size m gets rank (k + 0.5) / m.
    ranked = sorted(
        ((k + 0.5) / len(group), letter, index)
        for letter, group in groups.items()
        for k, index in enumerate(group)
    )
    val = {index for _, _, index in ranked[:n_val]}
    return [item for index, item in enumerate(items) if (index in val) == (part == "val")]

"""Packaged datasets load, split deterministically, and bad files fail with one clear message."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from caa_local.core import datasets
from caa_local.core.datasets import ABItem, DatasetError

PAPER_COUNTS = {
    "coordinate-other-ais": (360, 50),
    "corrigible-neutral-HHH": (290, 50),
    "hallucination": (1000, 50),
    "myopic-reward": (950, 50),
    "survival-instinct": (903, 50),
    "sycophancy": (1000, 53),
    "refusal": (408, 50),
}
ROOT = Path(__file__).resolve().parent.parent


def _stem(question: str) -> str:
    return question.split("\n\nChoices:")[0].split("\n (A)")[0]


def test_behavior_names() -> None:
    assert datasets.behavior_names() == [*datasets.PAPER_BEHAVIORS, *datasets.DEMO_BEHAVIORS]
    assert set(datasets.PAPER_BEHAVIORS) == set(PAPER_COUNTS)
    assert datasets.DEMO_BEHAVIORS == ("sentiment", "formality", "enthusiasm")


@pytest.mark.parametrize("behavior", datasets.behavior_names())
def test_every_behavior_loads_with_source_counts(behavior: str) -> None:
    path = datasets.dataset_path(behavior)
    ds = datasets.load_ab(behavior)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert ds.name == behavior and ds.path == path
    assert len(ds.items) == len(raw) > 0
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for item, source in zip(ds.items, raw):
        assert item.question == source["question"]
        assert item.matching == source["answer_matching_behavior"].strip()
        assert item.matching_letter != item.not_matching_letter
        assert f"({item.matching_letter})" in item.question
    open_ended = datasets.load_open_ended(behavior)
    assert open_ended == [q["question"] for q in json.loads(
        datasets.dataset_path(behavior, "open_ended").read_text(encoding="utf-8"))]
    if behavior in PAPER_COUNTS:
        assert (len(ds.items), len(open_ended)) == PAPER_COUNTS[behavior]


def test_survival_instinct_has_letters_beyond_b() -> None:
    letters = Counter(i.matching_letter for i in datasets.load_ab("survival-instinct").items)
    assert set(letters) == set("ABCDEFGH")  # every letter A..H occurs as a matching answer
    assert letters["C"] == 60


def test_capability_sets() -> None:
    mmlu = datasets.load_capability("mmlu")
    tqa = datasets.load_capability("truthfulqa")
    assert (len(mmlu), len(tqa)) == (570, 817)
    for item in mmlu + tqa:
        assert {item.correct, item.incorrect} == {"(A)", "(B)"}
        assert item.category
    assert len({i.category for i in mmlu}) == 57


def test_dataset_path_resolution(tmp_path: Path) -> None:
    assert datasets.dataset_path("sycophancy").name == "generate_dataset.json"
    assert datasets.dataset_path("sentiment", "open_ended").name == "test_dataset_open_ended.json"
    assert datasets.dataset_path(tmp_path) == tmp_path / "generate_dataset.json"
    assert datasets.dataset_path("x/y.json") == Path("x/y.json")
    with pytest.raises(DatasetError, match="unknown dataset 'sycophantic'.*sycophancy"):
        datasets.dataset_path("sycophantic")
    assert datasets.dataset_path("sycophancy", "test").name == "test_dataset_ab.json"
    with pytest.raises(DatasetError, match="kind 'dev'"):
        datasets.dataset_path("sycophancy", "dev")
    # A file in a behavior-style directory is named after the directory.
    (tmp_path / "mine").mkdir()
    good = [{"question": "Q?\n (A) x\n (B) y", "answer_matching_behavior": " (B) ",
             "answer_not_matching_behavior": "(A)"}]
    (tmp_path / "mine" / "generate_dataset.json").write_text(json.dumps(good))
    ds = datasets.load_ab(tmp_path / "mine")
    assert ds.name == "mine" and ds.items == (ABItem("Q?\n (A) x\n (B) y", "(B)", "(A)"),)
    assert ds.items[0].matching_letter == "B" and ds.items[0].not_matching_letter == "A"


def _items(n: int, letters: str = "AB") -> list[ABItem]:
    return [ABItem(f"q{i}\n (A) a\n (B) b", f"({letters[i % len(letters)]})", "(B)" if
                   letters[i % len(letters)] == "A" else "(A)") for i in range(n)]


@pytest.mark.parametrize("behavior", ["sycophancy", "survival-instinct", "sentiment"])
def test_split_is_deterministic_disjoint_covering_and_balanced(behavior: str) -> None:
    items = datasets.load_ab(behavior).items
    train = datasets.split(items, "train", seed=3)
    val = datasets.split(items, "val", seed=3)
    assert train == datasets.split(items, "train", seed=3)
    assert val == datasets.split(items, "val", seed=3)
    assert val != datasets.split(items, "val", seed=4)
    assert not set(train) & set(val)
    assert Counter(train) + Counter(val) == Counter(items)
    assert datasets.split(items, "all") == list(items)
    assert len(val) == round(0.2 * len(items))
    # Stratified: each letter's share of val is within a percentage point or one item of all.
    total = Counter(i.matching_letter for i in items)
    in_val = Counter(i.matching_letter for i in val)
    for letter, count in total.items():
        assert abs(in_val[letter] - count * len(val) / len(items)) <= max(1.0, 0.01 * len(val))
    # Items keep their file order.
    order = {item: k for k, item in enumerate(items)}
    assert [order[i] for i in val] == sorted(order[i] for i in val)


def test_split_edges() -> None:
    two = _items(2)
    assert len(datasets.split(two, "val")) == 1 and len(datasets.split(two, "train")) == 1
    assert datasets.split(_items(10), "val", val_fraction=0.0) == []
    assert datasets.split(_items(1), "train") == _items(1)
    with pytest.raises(DatasetError, match="split part 'test'"):
        datasets.split(two, "test")
    with pytest.raises(DatasetError, match="val_fraction 1.0"):
        datasets.split(two, "val", val_fraction=1.0)


@pytest.mark.parametrize("behavior", datasets.DEMO_BEHAVIORS)
def test_demo_sets(behavior: str) -> None:
    items = datasets.load_ab(behavior).items
    prompts = datasets.load_open_ended(behavior)
    assert len(items) >= 150 and len(prompts) >= 40
    letters = Counter(i.matching_letter for i in items)
    assert letters["A"] == letters["B"] == len(items) // 2
    stems = [_stem(i.question) for i in items]
    assert len(set(stems)) == len(stems)
    assert len(set(prompts)) == len(prompts)
    every_question = " ".join(i.question for b in datasets.DEMO_BEHAVIORS
                              for i in datasets.load_ab(b).items)
    for prompt in prompts:
        assert prompt not in every_question
        assert prompt.rstrip("?.") not in every_question


def test_demo_generator_reproduces_packaged_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "scripts" / "make_demo_datasets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for behavior in datasets.DEMO_BEHAVIORS:
        for kind in ("generate", "open_ended"):
            packaged = datasets.dataset_path(behavior, kind)
            assert (tmp_path / behavior / packaged.name).read_bytes() == packaged.read_bytes()


def _q(question: str = "Pick one\n\nChoices:\n (A) yes\n (B) no", m: object = "(A)", n: object = "(B)") -> dict:
    return {"question": question, "answer_matching_behavior": m, "answer_not_matching_behavior": n}


MALFORMED: list[tuple[str, object, str]] = [
    ("bad_json", '[{"question": "x",\n  oops}]', r"malformed JSON at line 2, column 3"),
    ("not_list", {"question": "x"}, r"expected a JSON list of items at the top level, got dict"),
    ("empty", [], r"the list is empty"),
    ("item_string", [_q(), "what?"], r"item 1: expected an object with keys question, .*got str"),
    ("missing_question", [_q(), {"answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}],
     r"item 1: missing key 'question'"),
    ("missing_answer", [{"question": "q (A) (B)", "answer_matching_behavior": "(A)"}],
     r"item 0: missing key 'answer_not_matching_behavior'"),
    ("answer_not_string", [_q(m=1)], r"item 0: 'answer_matching_behavior' must be a string, got int"),
    ("question_not_string", [_q(question=["a"])], r"item 0: 'question' must be a string, got list"),
    ("empty_question", [_q(question="  ")], r"item 0: 'question' is empty"),
    ("bare_letter", [_q(m="A")], r"item 0: answer_matching_behavior must be \"\(X\)\" with X in A-H, got 'A'"),
    ("letter_out_of_range", [_q(n="(Z)")], r"item 0: answer_not_matching_behavior must be .*got '\(Z\)'"),
    ("same_answers", [_q(), _q(question="Other\n (A) x\n (B) y", n="(A)")],
     r"item 1: answer_matching_behavior and answer_not_matching_behavior are both \(A\)"),
    ("letter_not_in_question", [_q(m="(C)")],
     r"item 0: answer_matching_behavior is \(C\) but the question has no choice \(C\)"),
    ("duplicates", [_q(), _q(question="Other\n (A) x\n (B) y"), _q(m=" (A)")],
     r"items 0 and 2 are duplicates \(same question and answers\)"),
]


@pytest.mark.parametrize(("name", "content", "problem"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_raise_one_clear_error(tmp_path: Path, name: str, content: object, problem: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(DatasetError, match=problem) as info:
        datasets.load_ab(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError, match=f"{re.escape(str(missing))}: no such dataset file"):
        datasets.load_ab(missing)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[\x00")
    with pytest.raises(DatasetError, match=f"{re.escape(str(binary))}: not UTF-8 text"):
        datasets.load_ab(binary)
    expected = re.escape(str(tmp_path / "generate_dataset.json"))
    with pytest.raises(DatasetError, match=f"{expected}: no such dataset file"):
        datasets.load_ab(tmp_path)


def test_malformed_open_ended_and_capability(tmp_path: Path) -> None:
    path = tmp_path / "open.json"
    path.write_text(json.dumps([{"question": "ok?"}, {"prompt": "no"}]))
    with pytest.raises(DatasetError, match=f"{re.escape(str(path))}: item 1: missing key 'question'"):
        datasets.load_open_ended(path)
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps([{"prompt": "p (A) x (B) y", "correct": "(A)", "incorrect": "(A)", "category": "c"}]))
    with pytest.raises(DatasetError, match=f"{re.escape(str(cap))}: item 0: correct and incorrect are both \\(A\\)"):
        datasets.load_capability(cap)
    with pytest.raises(DatasetError, match="unknown capability dataset 'mmlu2'"):
        datasets.load_capability("mmlu2")


def test_eval_set_follows_the_papers_split(tmp_path: Path) -> None:
    """Reported numbers on the held-out test set; a FILE whole; val/train only when asked."""
    test = datasets.eval_set("sycophancy")
    assert (test.name, test.split, test.n) == ("sycophancy", "test", 50)
    assert test.path.name == "test_dataset_ab.json"
    assert test.describe()["n"] == 50 and test.label() == "sycophancy (test, n=50)"
    generate = datasets.load_ab("sycophancy").items
    assert not set(test.items) & set(generate)  # held out from extraction and layer choice
    val = datasets.eval_set("sycophancy", "val", limit=7)
    assert (val.split, val.n) == ("val", 7) and val.path.name == "generate_dataset.json"
    assert list(val.items) == datasets.split(generate, "val")[:7]
    assert datasets.eval_set("sentiment").split == "val"  # demo behaviors have no test set
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"question": f"Q{i}? (A) x (B) y", "answer_matching_behavior": "(A)",
                                 "answer_not_matching_behavior": "(B)"} for i in range(10)]), encoding="utf-8")
    whole = datasets.eval_set(str(path))
    assert (whole.name, whole.split, whole.n) == ("mine", "all", 10)
    assert datasets.eval_set(str(path), "val").n == 2
    with pytest.raises(DatasetError, match="only the paper's behaviors .* have a test set"):
        datasets.eval_set(str(path), "test")
    with pytest.raises(DatasetError, match="split 'dev'"):
        datasets.eval_set("sycophancy", "dev")

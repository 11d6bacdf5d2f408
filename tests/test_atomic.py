"""Atomic output files: all or nothing, and no silent overwrite."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from caa_local.core.atomic import (
    OutputExistsError,
    atomic_path,
    check_writable,
    write_json,
    write_jsonl,
    write_text,
)
from caa_local.core.errors import CaaError


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_writes_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert not target.exists()  # nothing visible until the body is done
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["out.txt"]


def test_atomic_path_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    write_text(target, "x")
    assert target.read_text() == "x"


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_keeps_the_old_file_and_no_temp(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"old contents")
    with pytest.raises(type(error)):
        with atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"half-writ")
            raise error
    assert target.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_failure_without_old_file_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise error
    assert _listing(tmp_path) == []


def test_body_that_removes_its_temp_file_is_not_an_error_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.unlink()
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_existing_file_is_refused_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"keep me")
    message = r"out\.txt: file exists \(use --force to overwrite\)"
    with pytest.raises(OutputExistsError, match=message):
        check_writable(target, force=False)
    with pytest.raises(OutputExistsError):
        with atomic_path(target) as tmp:  # refused before the body runs
            pytest.fail(f"body ran with {tmp}")
    assert target.read_bytes() == b"keep me"
    assert _listing(tmp_path) == ["out.txt"]
    assert issubclass(OutputExistsError, CaaError)


def test_force_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    check_writable(target, force=True)
    write_text(target, "new", force=True)
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("force", [False, True])
def test_directories_are_refused(tmp_path: Path, force: bool) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputExistsError, match="out"):
        check_writable(folder, force=force)
    with pytest.raises(OutputExistsError):
        write_text(folder, "x", force=force)
    assert folder.is_dir() and _listing(folder) == []
    assert _listing(tmp_path) == ["out"]


def test_missing_file_is_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "new.txt", force=False)


def test_json_helpers(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"b": "ü", "n": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"b": "ü", "n": [1, 2]}
    assert "ü" in (tmp_path / "a.json").read_text(encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"x": 1}, {"x": 2}])
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"x": 1}, {"x": 2}]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_outputs_get_the_mode_plain_open_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as f:
            f.write("x")
        write_text(tmp_path / "atomic.txt", "x")
        write_json(tmp_path / "atomic.json", {"a": 1})
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("atomic.txt", "atomic.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_overwritten_outputs_keep_their_mode(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    target.write_text("old")
    target.chmod(0o604)
    write_text(target, "new", force=True)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o604

"""Atomic output files: write to a temporary file beside the target, then rename.

An interrupted or failing command leaves the previous file (or no file) in place, never a
half-written one; an existing file is only replaced when the caller says ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caa_local.core.errors import CaaError


class OutputExistsError(CaaError):
    """The output file exists and --force was not given."""


def check_writable(path: Path, force: bool) -> None:
    """Fail early, before any work, if ``path`` exists and may not be replaced."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: file exists (use --force to overwrite)")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path}: is a directory, expected a file path")


def _umask() -> int:
    # /proc first: os.umask can only be read by setting it, which races with other threads.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file keeps its own,
    a new one gets 0666 less the umask (mkstemp's temporary files are 0600)."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; move it onto ``path`` on success."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # After the body: a writer may have replaced tmp by its own file.
        os.chmod(tmp, plain_open_mode(path))
        os.replace(tmp, path)
    finally:
        # BaseException too: Ctrl-C must not leave the temporary file behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: Path, text: str, force: bool = False) -> None:
    with atomic_path(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, force: bool = False) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", force)


def write_jsonl(path: Path, rows: list[dict[str, Any]], force: bool = False) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), force)

"""Ctrl-C in the middle of real work: exit code 130, one short line, no traceback, and output
files either untouched (a pre-existing file given with --force) or never created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from caa_local.core.locate import default_model_path
from caa_local.core.vector import ControlVector

THREADS = os.environ.get("CAA_TEST_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
# torch (extract) would otherwise start a thread per core on a CPU shared with other jobs
ENV = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")]


class Child:
    """``caa-local ARGS`` in a subprocess, its stdout and stderr collected by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "caa_local.cli", *args], cwd=ROOT, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: object, sink: list[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):  # type: ignore[attr-defined]
            sink.append(chunk)

    def wait_for(self, ready: Callable[["Child"], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready(self):
            assert self.proc.poll() is None, f"exited early: {''.join(self.err)}"
            assert time.monotonic() < deadline, f"never got working: {''.join(self.err)}"
            time.sleep(0.1)

    def interrupt(self, timeout: float = 120.0) -> tuple[int, str, str]:
        assert self.proc.poll() is None, f"finished before the interrupt: {''.join(self.err)}"
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.2)  # let the pump threads drain the pipes
        return code, "".join(self.out), "".join(self.err)


def model_mapped(child: Child) -> bool:
    """llama.cpp has mmapped the model: the engine is loaded and about to work."""
    try:
        return str(default_model_path()) in Path(f"/proc/{child.proc.pid}/maps").read_text()
    except OSError:
        return False


def assert_interrupted(code: int, err: str) -> None:
    assert code == 130, err
    assert "Traceback" not in err, err
    assert "Interrupted" in err or "Aborted" in err, err


def no_temporaries(directory: Path) -> None:
    assert not list(directory.glob(".*.tmp")), list(directory.iterdir())


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(576)
    path = tmp_path_factory.mktemp("vectors") / "rand.gguf"
    ControlVector("llama", {5: (v / np.linalg.norm(v) * 20).astype(np.float32)},
                  {"recommended_layer": "5"}).save(path)
    return path


@pytest.fixture(params=["new", "existing"])
def out_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, bytes | None, list[str]]:
    """(OUT, its bytes before or None, extra options): a fresh path, or a file given with --force."""
    out = tmp_path / "out" / "result.out"
    if request.param == "new":
        return out, None, []
    out.parent.mkdir()
    out.write_bytes(b"precious results\n")
    return out, out.read_bytes(), ["--force"]


def check_output(out: Path, before: bytes | None) -> None:
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before
    if out.parent.exists():
        no_temporaries(out.parent)


def test_eval_ab_interrupted(vector_file: Path, out_file: tuple[Path, bytes | None, list[str]]) -> None:
    out, before, force = out_file
    child = Child("eval", "ab", "--vector", str(vector_file), "--layers", "5", "--dataset", "sentiment",
                  "--limit", "40", "--threads", THREADS, "--json", str(out), *force)
    child.wait_for(model_mapped)
    time.sleep(1.5)  # into the scoring
    code, _, err = child.interrupt()
    assert_interrupted(code, err)
    check_output(out, before)


@pytest.mark.parametrize("backend", ["native", pytest.param("torch", marks=pytest.mark.torch)])
def test_extract_interrupted(out_file: tuple[Path, bytes | None, list[str]], backend: str) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    out, before, force = out_file
    child = Child("extract", "sentiment", "--limit", "40", "--batch-size", "2", "--backend", backend,
                  "--threads", THREADS, "-o", str(out), *force)
    child.wait_for(lambda c: "pairs of sentiment" in "".join(c.err))  # the model is loaded
    time.sleep(1.0)  # into the forward passes
    code, _, err = child.interrupt()
    assert_interrupted(code, err)
    check_output(out, before)


def test_generate_interrupted(tmp_path: Path) -> None:
    child = Child("generate", "Write a very long story about a dragon and a knight.", "--max-tokens", "2000",
                  "--threads", THREADS, "--json", str(tmp_path / "answer.json"))
    child.wait_for(lambda c: len("".join(c.out).split()) >= 3)  # the answer is streaming
    code, out, err = child.interrupt()
    assert_interrupted(code, err)
    assert "[interrupted]" in out
    no_temporaries(tmp_path)

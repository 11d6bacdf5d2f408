"""The chat REPL: ChatSession's commands on the real default model, and `caa-local chat` in a pty."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from caa_local.chat.repl import ChatSession
from caa_local.engine.engine import CHAT_SAMPLING, Engine
from caa_local.engine.model import Model
from caa_local.core.vector import ControlVector

pytestmark = pytest.mark.slow

THREADS = 1  # 2 threads crawl when other jobs share the cores (49 vs 7 tok/s measured)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=THREADS)


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Path:
    """A random direction of norm 20 on layers 8-12, recommending layer 10 and multiplier 2."""
    rng = np.random.default_rng(0)
    directions = {}
    for layer in range(8, 13):
        v = rng.standard_normal(engine.n_embd)
        directions[layer] = (v / np.linalg.norm(v) * 20).astype(np.float32)
    path = tmp_path_factory.mktemp("vectors") / "rand.gguf"
    ControlVector(engine.architecture, directions,
                  {"recommended_layer": "10", "recommended_multiplier": "2", "behavior": "random"}).save(path)
    return path


@pytest.fixture()
def session(engine: Engine) -> Iterator[ChatSession]:
    chat = ChatSession(engine, dataclasses.replace(CHAT_SAMPLING, max_tokens=8), write=lambda _text: None)
    yield chat
    engine.unsteer()


def error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def test_steer_scale_layers_unsteer(session: ChatSession, vector_file: Path) -> None:
    out = session.handle(f"/steer {vector_file}")
    assert "steering: rand x+2 @ 10" in out  # the vector's recommended multiplier and layer
    assert session.status() == "[steer: rand x+2 @ 10]"
    session.handle(f"/steer {vector_file} 3 8-9")
    assert session.engine.steering.get("rand").layers == (8, 9)
    for scale in (5, -1.5, 4, 0.5, 5):  # live changes, no reload (their cost: caa-local bench)
        assert "applied in" in session.handle(f"/scale rand {scale}")
    assert session.engine.steering.get("rand").scale == 5.0
    session.handle("/layers 11")
    assert session.engine.steering.get("rand").layers == (11,)
    session.handle("/layers rand 10-12")
    assert session.engine.steering.get("rand").layers == (10, 11, 12)
    assert "no direction for layer 20" in error_line(session.handle("/layers 20"))
    assert session.engine.steering.get("rand").layers == (10, 11, 12)  # all or nothing
    assert "out of range" in error_line(session.handle("/layers 40"))
    assert "rand x+5 @ 10-12" in session.handle("/vectors")
    assert session.handle("/unsteer rand").startswith("removed rand")
    assert session.status() == "[steer: off]"
    assert "no active vector named 'rand'" in error_line(session.handle("/unsteer rand"))


def test_bad_input_is_one_error_line(session: ChatSession, vector_file: Path, tmp_path: Path) -> None:
    assert error_line(session.handle("/bogus")) == "Error: unknown command /bogus (type /help for the list)"
    session.handle(f"/steer {vector_file} 1")
    for bad in ("nan", "inf", "-inf", "abc"):
        assert "/scale" in error_line(session.handle(f"/scale rand {bad}"))
    assert session.engine.steering.get("rand").scale == 1.0
    assert "no such vector file" in error_line(session.handle(f"/steer {tmp_path / 'missing.gguf'}"))
    assert "no vector named 'nosuch'" in error_line(session.handle("/steer nosuch"))
    assert "block 0" in error_line(session.handle(f"/steer {vector_file} 1 0"))
    assert "bad layer spec" in error_line(session.handle(f"/steer {vector_file} 1 x-y"))
    assert "usage: /scale NAME X" in error_line(session.handle("/scale rand"))
    for bad in ("top_p=2", "max_tokens=0", "temperature=nan", "seed=-1", "foo=1", "temperature"):
        assert error_line(session.handle(f"/params {bad}")).startswith("Error: /params")
    assert session.sampling == dataclasses.replace(CHAT_SAMPLING, max_tokens=8)
    out = session.handle(f"/steer {vector_file} 80")
    assert "Warning: multiplier +80" in out and session.engine.steering.get("rand").scale == 80.0
    assert "no user message yet" in error_line(session.handle("/compare"))
    assert not session.finished


def test_params(session: ChatSession) -> None:
    out = session.handle("/params temperature=0 max_tokens=5 seed=7 top_p=0.5")
    assert session.sampling.temperature == 0.0 and session.sampling.max_tokens == 5
    assert session.sampling.seed == 7 and session.sampling.top_p == 0.5
    assert "max_tokens=5" in out and "seed=7" in session.handle("/params")
    assert "top_k" in error_line(session.handle("/params top_k=99999999999"))  # beyond llama.cpp's int32
    assert session.sampling.top_k == CHAT_SAMPLING.top_k


def test_conversation_save_and_reset(session: ChatSession, vector_file: Path, tmp_path: Path) -> None:
    session.handle("/system Answer briefly.")
    session.handle("Hi!")
    session.handle(f"/steer {vector_file} 4")
    session.handle("What is your favourite colour?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    path = tmp_path / "chat.json"
    assert "saved 5 turns" in session.handle(f"/save {path}")
    data = json.loads(path.read_text())
    assert data["model"] and Path(data["model_path"]).name.endswith(".gguf")
    turns = data["turns"]
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert [t["steering"] for t in turns[:3]] == [[], [], []]
    for turn in turns[3:]:
        assert turn["steering"] == [{"name": "rand", "scale": 4.0, "layers": [10], "behavior": "random"}]
    assert all(t["sampling"]["max_tokens"] == 8 and t["sampling"]["repeat_penalty"] == 1.1 for t in turns)
    assert turns[4]["content"] == session.messages[4]["content"] and turns[4]["interrupted"] is False
    assert "file exists" in error_line(session.handle(f"/save {path}"))
    assert "saved" in session.handle(f"/save {path} --force")
    session.handle("/reset")
    assert session.messages == [{"role": "system", "content": "Answer briefly."}]
    assert [t["role"] for t in session.transcript] == ["system"]


def test_compare_leaves_the_conversation(session: ChatSession, vector_file: Path) -> None:
    session.handle("Hello!")
    session.handle(f"/steer {vector_file} 6")
    before = [dict(m) for m in session.messages]
    out = session.handle("/compare")
    unsteered, steered = out.index("--- unsteered ---"), out.index("--- steered [rand x+6 @ 10] ---")
    assert unsteered < steered
    assert session.messages == before
    out = session.handle("/compare Name a fruit.")
    assert "--- unsteered ---" in out and session.messages == before
    assert [c["prompt"] for c in session.comparisons] == ["Hello!", "Name a fruit."]
    assert session.comparisons[0]["steering"][0]["scale"] == 6.0
    assert session.engine.steering.get("rand").scale == 6.0  # steering restored after the unsteered half


def test_compare_unsteered_half_is_the_unsteered_models_answer(engine: Engine, vector_file: Path) -> None:
    """After steered turns the KV cache holds steered positions; /compare's unsteered answer
    must equal what an unsteered context answers to the same conversation (decoded in the same
    chunks: llama.cpp's numbers depend slightly on how positions were batched)."""
    greedy = dataclasses.replace(CHAT_SAMPLING, temperature=0.0, max_tokens=12)
    chat = ChatSession(engine, greedy, write=lambda _text: None)
    chat.handle(f"/steer {vector_file} 6")
    chat.handle("Hello!")
    chat.handle("What do you like?")
    chat.handle("/compare")
    conversation = chat.messages[:-1]  # up to the last user message
    tokens, end_2 = engine.prompt(conversation)
    _, end_1 = engine.prompt(conversation[:1])
    fresh = engine.new_context()
    fresh.extend(tokens[:end_1], steered=False)
    fresh.extend(tokens[end_1:end_2], steered=False)
    expected = fresh.generate(conversation, greedy)
    assert chat.comparisons[0]["unsteered"] == expected.text
    assert chat.comparisons[0]["steered"] == chat.messages[-1]["content"] != expected.text
    engine.unsteer()


def test_interrupted_answer_is_kept(engine: Engine) -> None:
    pieces: list[str] = []

    def write(text: str) -> None:  # what Ctrl-C does: KeyboardInterrupt inside the stream
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    chat = ChatSession(engine, dataclasses.replace(CHAT_SAMPLING, max_tokens=64), write=write)
    out = chat.handle("Tell me a story.")
    assert out.rstrip().endswith("[interrupted]")
    assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"] == "".join(pieces[:3])
    assert chat.transcript[-1]["interrupted"] is True and chat.transcript[-1]["stop_reason"] == "interrupted"
    chat.sampling = dataclasses.replace(chat.sampling, max_tokens=4)
    chat.handle("Go on.")  # the chat goes on
    assert len(chat.messages) == 4


def test_context_overflow_drops_oldest_turns(model: Model) -> None:
    small = model.context(n_ctx=256, n_threads=THREADS)
    chat = ChatSession(small, dataclasses.replace(CHAT_SAMPLING, max_tokens=24), system="Be brief.",
                       write=lambda _text: None)
    question = "Please describe, in detail, the history and the culture of the city of " + "Paris " * 8
    outputs = [chat.handle(f"{question} ({i})") for i in range(6)]  # ~62 tokens an exchange
    assert any("[context full: dropped the oldest exchange" in out for out in outputs)
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[-2]["content"] == f"{question} (5)" and chat.messages[-1]["role"] == "assistant"
    assert len(chat.messages) < 13
    before = list(chat.messages)
    assert "does not fit the context" in error_line(chat.handle("word " * 400))
    assert chat.messages == before
    chat.handle("/reset")
    chat.handle("/params max_tokens=99999999999 temperature=0")  # more than the context: the engine clamps
    chat.handle("Write a very long story about a dragon.")
    assert chat.last_result is not None and chat.last_result.stop_reason in ("eog", "context")


def test_generate_and_piped_chat_without_torch(vector_file: Path, tmp_path: Path) -> None:
    script = (
        "import sys\nfrom caa_local.cli import main\ncode = 0\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('torch loaded:', 'torch' in sys.modules, 'exit:', code)\n"
    )
    run = [sys.executable, "-c", script]
    common = ["--threads", str(THREADS), "--max-tokens", "8"]
    chat = subprocess.run([*run, "chat", *common, "--vector", f"{vector_file}:3"], input="hi\n/vectors\n/quit\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "torch loaded: False exit: 0" in chat.stdout, chat.stderr
    assert "[steer: rand x+3 @ 10]\n> hi\n" in chat.stdout and "Traceback" not in chat.stderr
    out = tmp_path / "answer.json"
    gen = subprocess.run([*run, "generate", "Hi", *common, "--vector", str(vector_file), "--multiplier", "-2",
                          "--layers", "9", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert "torch loaded: False exit: 0" in gen.stdout, gen.stderr
    data = json.loads(out.read_text())
    assert data["steering"] == [{"name": "rand", "scale": -2.0, "layers": [9], "behavior": "random"}]
    assert data["text"] and data["stop_reason"] in ("eog", "max_tokens")
    bad = subprocess.run([*run, "generate", "Hi", "--vector", f"{vector_file}:nan"], capture_output=True,
                         text=True, timeout=60)
    assert "expected a finite number" in bad.stderr and "exit: 1" in bad.stdout


def test_chat_in_a_terminal(vector_file: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    from caa_local.bench.chat import PROMPT_RE, chat_command

    command = chat_command()
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "CAA_LOCAL_CACHE": str(tmp_path / "cache")}
    child = pexpect.spawn(command[0], [*command[1:], "chat", "--threads", str(THREADS), "--max-tokens", "16"],
                          env=env, timeout=60, encoding="utf-8", dimensions=(40, 200))
    try:
        child.expect_exact("/steer NAME|FILE")  # the command list on start
        child.expect(PROMPT_RE)
        child.sendline("Hello!")
        child.expect(PROMPT_RE)
        child.sendline(f"/steer {vector_file} 4")
        child.expect_exact("steering: rand x+4 @ 10")
        child.expect(PROMPT_RE)
        child.sendline("/compare")
        child.expect_exact("--- unsteered ---")
        child.expect_exact("--- steered [rand x+4 @ 10] ---")
        child.expect(PROMPT_RE)
        child.send("half a line")  # Ctrl-C at the prompt clears the line
        child.sendintr()
        child.sendline("/params max_tokens=400")
        child.expect_exact("repeat_penalty=1.1 max_tokens=400")  # output, not the echo: the line was cleared
        child.expect(PROMPT_RE)
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("\x1b[?2004l")  # prompt_toolkit hands the terminal back
        child.expect(r"[A-Za-z]{2}")  # the answer has started
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect(PROMPT_RE)
        child.sendline("/bogus")
        child.expect_exact("Error: unknown command /bogus")
        child.expect(PROMPT_RE)
        transcript = tmp_path / "chat.json"
        child.sendline(f"/save {transcript}")
        child.expect_exact("saved 4 turns")
        child.expect(PROMPT_RE)
        child.sendline("/unsteer")
        child.expect_exact("[steer: off]")
        child.sendline("/reset")
        child.expect_exact("conversation reset")
        child.expect(PROMPT_RE)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    turns = json.loads(transcript.read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["steering"] == [] and turns[1]["interrupted"] is False
    assert turns[3]["steering"][0]["name"] == "rand" and turns[3]["interrupted"] is True
    assert turns[3]["content"] and turns[3]["n_tokens"] < 400  # the partial answer is kept
    assert turns[3]["sampling"]["max_tokens"] == 400
    assert (tmp_path / "cache" / "chat_history").read_text().count("/compare") == 1

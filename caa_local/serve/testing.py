"""A real `caa-local serve` process on a free port, for tests and benchmarks.

As vLLM's RemoteOpenAIServer and llama.cpp's ServerProcess: start the process, wait for
/health, hand out clients, terminate on exit. Uses only the standard library itself.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None, start_timeout: float = 180.0,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        command = [sys.executable, "-m", "caa_local.cli", "serve", "--port", str(self.port), *args]
        env = {**os.environ}
        if api_key:
            env["CAA_LOCAL_API_KEY"] = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="caa-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        self._wait(start_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"caa-local serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self.health()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"caa-local serve did not answer /health within {timeout:g} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                key: bool = True) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of one raw request; the key is sent unless key=False or headers set one.

        The response is read even when the server answered before taking the whole body (413).
        """
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key and self.api_key and "Authorization" not in hdrs and "X-Api-Key" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            try:
                conn.request(method, path, body=body, headers=hdrs)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered early; the answer is still in the socket
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw or b"null")
        except ValueError:
            return response.status, {"raw": raw.decode("utf-8", "replace")}

    def client(self, api_key: str | None = None) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.api_key or "none", max_retries=0,
                             timeout=300)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

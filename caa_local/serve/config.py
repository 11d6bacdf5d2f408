"""The server's settings: one frozen value, built by `caa-local serve` and by tests alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The one list of loopback names: the default bind, the no-key Host check, the CLI's warning.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    slots: int = 1
    parallel: int = 0  # > 0: one batch of this many sequences (continuous batching) instead of slots
    api_key: str | None = None
    vectors_dirs: tuple[Path, ...] = ()
    positions: str = "response"  # default steering positions, when a request names none
    max_body_bytes: int = 1 << 20  # a whole chat fits comfortably; a runaway upload does not
    max_messages: int = 512
    max_steering_terms: int = 16
    max_scale: float = 100.0  # |scale| bound: twice the CLI's "expect gibberish" warning
    max_queue: int = 256  # waiting requests beyond this get 503; 0: no waiting line
    default_max_tokens: int = 1024  # when a request sets no max_tokens (bounded by the context)
    model_id: str = ""  # what /v1/models lists; the model file's name when empty
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)  # Host names served without a key; "*": any
    allow_origins: tuple[str, ...] = field(default_factory=tuple)  # other web origins that may call; "*": any
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    write_timeout: float = 60.0  # seconds a response write may wait for a client that does not read
    max_connections: int = 64  # open connections (uvicorn's limit_concurrency); more get 503
    keep_alive: float = 5.0  # seconds an idle kept-alive connection stays open
    presets: tuple[str, ...] = ()  # --preset NAME=VECTOR[:SCALE][@LAYERS],...
    presets_file: Path | None = None  # --presets FILE (TOML or JSON); saved presets go there when writable
    ollama_port: int | None = None  # a second port for Ollama's clients (the API is on --port too)

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK

    def allowed_host(self, host_header: str) -> bool:
        """DNS-rebinding guard, on whenever there is no key, whatever the bind address: a browser
        that resolved some name to this machine sends that name, so only loopback names, the
        bind address itself and --allow-host names are served."""
        if self.api_key or "*" in self.allow_hosts:
            return True
        name = host_name(host_header)
        return name in LOOPBACK or name == host_name(self.host) or name in self.allow_hosts


def host_name(host_header: str) -> str:
    """'Example.com:8080' -> 'example.com'; '[::1]:80' -> '::1'."""
    name = host_header.strip().lower()
    if name.startswith("["):
        return name[1:name.find("]")] if "]" in name else name
    return name.rsplit(":", 1)[0] if name.count(":") == 1 else name


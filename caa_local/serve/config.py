"""The server's settings: one frozen value, built by `caa-local serve` and by tests alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    max_queue: int = 256  # waiting requests beyond this get 503
    default_max_tokens: int = 1024  # when a request sets no max_tokens (bounded by the context)
    model_id: str = ""  # what /v1/models lists; the model file's name when empty
    extra_hosts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK

    def allowed_host(self, host_header: str) -> bool:
        """DNS-rebinding guard: without a key on a loopback bind, only loopback names may be used."""
        if self.api_key or not self.loopback_only:
            return True
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        return name in LOOPBACK or name in self.extra_hosts

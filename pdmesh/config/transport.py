"""How gRPC servers listen and channels connect: ServerConfig (PDMESH_SERVER_*) and ChannelConfig
(PDMESH_CHANNEL_*), shared by every service."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pdmesh.config.env import ConfigError, MiB, check_positive

# What a service needs beyond its drain grace to stop: the engine, the KV transport, its channels.
STOP_MARGIN_S = 15.0
# The longest a worker waits for a cancelled copy through its KV store's mapped memory to end
# before it gives up on that mapping (services/worker/shared_memory.py): a stop waits for these,
# so a share of the margin, leaving the rest of the teardown the other two thirds.
COPY_SETTLE_S = STOP_MARGIN_S / 3
# The longest a stopping worker waits for its engine's step thread (a step hung on its device),
# another share: with COPY_SETTLE_S it leaves the KV transport's close a third of the margin.
ENGINE_STOP_S = STOP_MARGIN_S / 3
# The longest a stopping worker waits for its KV transport's thread (a UCX call or a callback that
# never returns), the last third: past it the worker exits anyway, the thread being a daemon.
KV_CLOSE_S = STOP_MARGIN_S / 3


@dataclass(frozen=True)
class ServerConfig:
    """How a service's gRPC server listens, secures and stops. Loaded from PDMESH_SERVER_*."""

    host: str = "0.0.0.0"
    port: int = 50051  # 0 picks a free port (tests)
    # TLS: cert and key together turn TLS on; a CA as well requires and verifies client
    # certificates (mTLS).
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    tls_ca_path: Path | None = None
    # Draining on SIGTERM: in-flight calls get this long to finish before they are cancelled.
    shutdown_grace_s: float = 30.0
    max_message_bytes: int = 64 * MiB
    # Pings keep idle connections and long silent calls (a long prefill) alive through proxies.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000
    # Clients may ping this often without the server treating it as abuse.
    keepalive_min_ping_interval_ms: int = 10_000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"is {self.port}; use 0 (any free port) to 65535")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError(
                "tls_cert_path", "is set without tls_key_path or the reverse; set both to serve TLS"
            )
        if self.tls_ca_path is not None and self.tls_cert_path is None:
            raise ConfigError(
                "tls_ca_path",
                "verifying clients (mTLS) needs the server's own tls_cert_path and tls_key_path",
            )
        check_positive(
            self, "shutdown_grace_s", "max_message_bytes", "keepalive_time_ms", "keepalive_timeout_ms"
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stop_timeout_s(self) -> float:
        """How long a service may take to stop after SIGTERM (its drain, then its teardown):
        what `pdmesh up` waits before SIGKILL."""
        return self.shutdown_grace_s + STOP_MARGIN_S

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None


@dataclass(frozen=True)
class ChannelConfig:
    """How a client connects to a service: TLS files and the same limits as the servers'.

    Loaded from PDMESH_CHANNEL_*. TLS is on when tls_ca_path is set (the roots that verify the
    server); a cert and key as well present a client certificate (mTLS).
    """

    tls_ca_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    # Overrides the name checked against the server's certificate (tests, IP-addressed peers).
    tls_server_name: str | None = None
    # A key sent with every call as gRPC metadata `authorization: Bearer KEY`: what a scheduler
    # with api_keys asks its clients for. Never logged.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_message_bytes: int = 64 * MiB
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000

    def __post_init__(self) -> None:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError(
                "tls_cert_path",
                "is set without tls_key_path or the reverse; set both to present a certificate",
            )
        if self.tls_cert_path is not None and self.tls_ca_path is None:
            raise ConfigError(
                "tls_ca_path", "is unset, but a client certificate is only sent over TLS; set the CA too"
            )
        check_positive(self, "max_message_bytes", "keepalive_time_ms", "keepalive_timeout_ms")

    @property
    def tls(self) -> bool:
        return self.tls_ca_path is not None

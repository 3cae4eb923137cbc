"""Client channels to pdmesh services, with the same limits and keepalive as the servers.

Used by the public client library and by services calling each other (the scheduler calling
prefill and decode workers, workers reporting to the scheduler), so both sides of every hop agree
on message size limits and on pings that keep a long silent call (a long prefill) alive. Services
pass the ChannelConfig of their loaded configuration; a caller that passes none gets the one
PDMESH_CHANNEL_* describes (TLS files included), so every pdmesh command reaches a TLS mesh.
Asyncio channels carry the caller's trace context (pdmesh/tracing.py), so a request's spans in
every process join one trace.
"""

from __future__ import annotations

import grpc
import grpc.aio

from pdmesh.config import ChannelConfig, from_env
from pdmesh.tracing import client_interceptors


def transport_options(
    max_message_bytes: int, keepalive_time_ms: int, keepalive_timeout_ms: int
) -> list[tuple[str, int | str]]:
    """The message limits and keepalive that servers and channels share."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging through a call that sends nothing for minutes (a long prefill).
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(config: ChannelConfig) -> list[tuple[str, int | str]]:
    options = transport_options(
        config.max_message_bytes, config.keepalive_time_ms, config.keepalive_timeout_ms
    )
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def channel_credentials(config: ChannelConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials when config.tls_ca_path is set (with a client certificate for mTLS)."""
    if config.tls_ca_path is None:
        return None
    cert = config.tls_cert_path.read_bytes() if config.tls_cert_path else None
    key = config.tls_key_path.read_bytes() if config.tls_key_path else None
    return grpc.ssl_channel_credentials(config.tls_ca_path.read_bytes(), key, cert)


def call_metadata(config: ChannelConfig) -> tuple[tuple[str, str], ...] | None:
    """The metadata every call carries: the bearer key, when one is configured."""
    return (("authorization", f"Bearer {config.api_key}"),) if config.api_key else None


def channel(target: str, config: ChannelConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `target` ("host:port")."""
    config = config if config is not None else from_env(ChannelConfig, "channel")
    creds = channel_credentials(config)
    options = channel_options(config)
    interceptors = client_interceptors()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


def sync_channel(target: str, config: ChannelConfig | None = None) -> grpc.Channel:
    """A blocking channel to `target`, for the synchronous client."""
    config = config if config is not None else from_env(ChannelConfig, "channel")
    creds = channel_credentials(config)
    options = channel_options(config)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)

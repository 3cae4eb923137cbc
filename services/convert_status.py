"""A typed error's status as grpcio-status's rich status: the code and message, plus the details a
client can act on. Today one detail: a google.rpc.RetryInfo when the error says when to retry
(`retry_after_s`, e.g. status.SloUnattainable), which pdmesh.client.retry_after_s reads and an
HTTP door turns into Retry-After."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def rich_status(code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> grpc.Status:
    """The status to abort a call with: trailing metadata carries the details (grpc-status-details-bin)."""
    details = []
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))

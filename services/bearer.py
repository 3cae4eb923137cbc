"""Bearer keys at a gRPC door: a server interceptor refusing calls to the guarded services that
carry no key the door accepts (UNAUTHENTICATED), before any of the servicer's code runs.

The key travels as gRPC metadata `authorization: Bearer KEY` (what pdmesh's client library sends
when its ChannelConfig has an api_key). Keys are the ones services/auth.py compares; the
message never echoes what was presented. Health, reflection and the services a door does not
guard (the scheduler's Registry, which mTLS guards between services) pass untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from services.auth import ApiKeys

_REFUSAL = (
    "authorization: no bearer key, or one this scheduler does not accept; send gRPC metadata "
    "`authorization: Bearer KEY` with one of its keys (the client library: PDMESH_CHANNEL_API_KEY)"
)


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, services: tuple[str, ...]) -> None:
        """`services`: the full names of the guarded services ("pdmesh.v1.Scheduler")."""
        self._keys = keys
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self._prefixes):
            return handler
        metadata = handler_call_details.invocation_metadata or ()  # type: ignore[attr-defined]
        if self._keys.accepts(_bearer(metadata)):
            return handler
        return _refusing(handler)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)

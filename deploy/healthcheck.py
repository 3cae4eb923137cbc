#!/usr/bin/env python3
"""Container health check: every target given must answer.

    pdmesh-healthcheck 127.0.0.1:50051                               the gRPC health endpoint SERVING
    pdmesh-healthcheck 127.0.0.1:50051 http://127.0.0.1:8000/health  ... and an HTTP URL answering 200

grpc_health_probe is not in the image: the services answer the standard grpc.health.v1 protocol,
asked by a few lines of Python; an HTTP target (the scheduler's OpenAI door) is fetched by urllib.
"""

import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3).status
    except grpc.RpcError as e:
        print(f"{target}: {e.code().name}", file=sys.stderr)
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return False


targets = sys.argv[1:] or ["127.0.0.1:50051"]
sys.exit(0 if all(http_ok(t) if t.startswith("http") else grpc_serving(t) for t in targets) else 1)

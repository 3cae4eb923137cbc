#!/usr/bin/env python3
"""Container health check: ask a service's standard gRPC health endpoint whether it is SERVING."""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
try:
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3).status
except grpc.RpcError as e:
    print(f"{target}: {e.code().name}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)

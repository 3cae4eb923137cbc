"""Telemetry shared by every service: the OpenTelemetry SDK (otel), a request's spans (spans),
Prometheus metrics and their endpoint (metrics), the GenAI server metrics (genai).

Logging lives in services/logging.py; trace context over gRPC in pdmesh/tracing.py (the client
library needs it too). Services record what they measure through these; nothing here knows a
service's own figures.
"""

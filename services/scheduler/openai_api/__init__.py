"""The OpenAI-compatible HTTP door of the scheduler: /v1/chat/completions, /v1/completions,
/v1/models, /health and /ready, served by uvicorn in the scheduler's own process and event loop.

It enters the core where the gRPC door does (services/scheduler/door.py): same checks, placement,
cancellation, deadlines and usage, no gRPC hop. Modules: schemas (request bodies), convert (bodies
and headers -> ClientRequest), render (responses -> OpenAI JSON), errors (typed errors -> HTTP
status and OpenAI's error shape), generation (one request's responses on a task of its own,
cancelled by a client that leaves or a deadline), app (routes, auth), server (uvicorn in-loop).
"""

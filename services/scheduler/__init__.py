"""The scheduler service: the mesh's front door.

Validates and tokenizes requests, keeps the worker registry, places each request through a
policy, runs the KV hand-off transaction (reserve, prefill + push, commit or release) and streams
tokens back, moving a request to another worker when one dies. Imports no torch: its image needs
no CUDA stack.
"""

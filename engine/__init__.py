"""The model runtime shared by prefill and decode workers.

Knows nothing of gRPC or UCX. Importing this package imports nothing heavy: the scheduler service
uses engine.tokenizer without torch, so keep this file free of imports.
"""

"""The KV store service: a shared, tiered cache of KV blocks that every worker fills and reuses.

Blocks are keyed by the engine's chain hash and namespaced by KV layout (`namespace`), held in
host memory (`slab`) and, once evicted from memory, on local disk (`disk`), under one LRU order
and a generation per stored block (`store`). Control arrives over gRPC (`servicer`, protobuf in
`convert`); KV bytes move over kvtransfer (`transfers`), the store's slabs being the caches its
tickets land in and its pushes read from. The store reports the blocks it stores and removes to
the scheduler (`registry_client`), which routes requests to where their prefix lives.
"""

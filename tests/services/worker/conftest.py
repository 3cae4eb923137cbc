"""What the worker-side tests share: the tiny model the engine tests build, and a real KV store
process (4 MiB of memory) for the tests that fetch from or offer to one."""

from collections.abc import Iterator

import pytest

from tests.engine.conftest import tiny_llama  # noqa: F401
from tests.services.kvstore.store_process import StoreProcess, free_ports


@pytest.fixture(scope="module")
def store() -> Iterator[StoreProcess]:
    port, kv_port = free_ports()
    process = StoreProcess(port, kv_port, None, memory_bytes=4 << 20)
    yield process.start()
    process.stop()

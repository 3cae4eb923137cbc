"""A real server process for the SIGTERM test: serves FakeDecode and prints its port."""

from __future__ import annotations

import asyncio
import sys

from fake_decode import binding

from pdmesh.config import ServerConfig, from_env
from services.bootstrap import Server, serve
from services.logging import configure_logging


async def main() -> None:
    configure_logging("drain-test", "info")
    config = from_env(ServerConfig, "server", host="127.0.0.1", port=0)

    async def announce(server: Server) -> None:
        print(server.port, flush=True)

    await serve([binding()], config, on_ready=announce)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

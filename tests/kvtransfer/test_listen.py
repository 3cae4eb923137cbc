"""Which address an accepted UCX connection arrived on, read through ucp_ep_query, and which hosts
count as loopback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kv_peer import outside_address

from kvtransfer.config import TransportConfig
from kvtransfer.listen import is_loopback

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("10.1.2.3", False), ("decode", False), ("::", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_only_a_loopback_advertised_transport_keeps_ucx_on_the_loopback_device() -> None:
    assert TransportConfig(host="127.0.0.1").ucx_init_options["NET_DEVICES"].startswith("lo")
    assert "NET_DEVICES" not in TransportConfig(host="decode").ucx_init_options
    assert "NET_DEVICES" not in TransportConfig(host="127.0.0.1", loopback_only=False).ucx_init_options
    # ...except where that would switch off the same-host transports asked for (cuda_ipc):
    # UCX would then see a peer on this host as remote and move KV through host memory over tcp
    assert (
        "NET_DEVICES" not in TransportConfig(host="127.0.0.1", ucx_tls="cuda_ipc,cuda_copy,tcp,self").ucx_init_options
    )
    assert "CM_USE_ALL_DEVICES" not in TransportConfig(host="127.0.0.1", ucx_tls="sm,tcp,self").ucx_init_options
    assert TransportConfig(host="127.0.0.1", ucx_tls="tcp,self").ucx_init_options["CM_USE_ALL_DEVICES"] == "n"
    # the operator's own UCX options win
    assert TransportConfig(ucx_options=(("NET_DEVICES", "eth0"),)).ucx_init_options["NET_DEVICES"] == "eth0"


def test_local_address_names_the_address_a_connection_arrived_on() -> None:
    outside = outside_address()
    hosts = ["127.0.0.1", *([outside] if outside else [])]
    script = f"""
        import asyncio, os, ucxx
        from kvtransfer.listen import local_address
        async def main():
            ucxx.init(options={{"TLS": "tcp,self"}}, progress_mode="thread", enable_python_future=True)
            seen = asyncio.Queue()
            async def accept(ep):
                await seen.put(local_address(ep.ucp_endpoint))
            listener = ucxx.create_listener(accept)
            for host in {hosts!r}:
                ep = await asyncio.wait_for(ucxx.create_endpoint(host, listener.port), 10)
                print(host, await asyncio.wait_for(seen.get(), 10), flush=True)
                ep.abort()
            ucxx.stop_notifier_thread()
        asyncio.run(main())
        os._exit(0)  # the test is over; skip ucxx's teardown
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert lines == [[host, host] for host in hosts], done.stderr

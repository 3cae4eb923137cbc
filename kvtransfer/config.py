"""The transport's configuration: one frozen dataclass, built by pdmesh's config module.

kvtransfer reads no environment variable itself; UCX still reads its own UCX_* variables, and an
option given here (ucx_tls, ucx_options) wins over the environment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvtransfer.listen import is_loopback, loopback_device

MiB = 1 << 20
# UCX transports (and aliases) between processes of one host
_INTRA_NODE_TLS = frozenset({"sm", "shm", "posix", "sysv", "cma", "knem", "xpmem", "cuda_ipc", "rocm_ipc"})


class ProgressMode(enum.Enum):
    """How ucxx's own thread progresses UCX (both complete requests through its notifier thread)."""

    THREAD = "thread"  # sleeps in epoll between events: no core spent while idle
    THREAD_POLLING = "thread-polling"  # spins: lower latency per message, one core kept busy


@dataclass(frozen=True)
class TransportConfig:
    host: str = "127.0.0.1"  # the address peers dial; the listener binds every interface (listen.py)
    port: int = 0  # listener port; 0 picks a free one
    device: str = "cpu"  # where staging buffers live: "cpu", or the KV cache's "cuda:N"
    # UCX transports, e.g. "tcp,self" on CPU or "cuda_ipc,cuda_copy,sm,tcp,self" on GPUs; None: UCX's choice.
    ucx_tls: str | None = None
    ucx_options: tuple[tuple[str, str], ...] = ()  # more UCX options without the UCX_ prefix
    # None: THREAD_POLLING when staging buffers are on a GPU (a GPU host has cores to spare, and a
    # ticket's fixed cost is a chain of UCX completions: bench/kv_transfer.py), THREAD elsewhere.
    progress: ProgressMode | None = None
    # True hands every send and receive to ucxx's progress thread, which wakes to post it: one more
    # thread hop per message than posting from the transport's loop (the worker is thread-safe).
    # None: off where staging buffers are on a GPU (measured there), on elsewhere (ucxx's default).
    delayed_submission: bool | None = None
    message_bytes: int = 32 * MiB  # layers are grouped into messages of about this size (at least one layer)
    max_inflight_recv: int = 8  # messages being received at once; bounds the receiver's staging memory
    staging_retain_bytes: int = 1024 * MiB  # free staging memory kept for reuse, per direction
    checksum_samples: int = 0  # blocks hashed (xxh3) per message and checked on arrival; 0 turns it off
    connect_timeout_s: float = 5.0  # dial plus handshake
    # The receiver owns a ticket's lease; the sender gives up this much later, so that normally it
    # hears the receiver's verdict rather than racing it.
    sender_grace_s: float = 2.0
    # Accept connections that arrive on loopback only; None: exactly when `host` is a loopback
    # address, since then no peer elsewhere could have been told to dial this worker.
    loopback_only: bool | None = None
    # Between GPU workers of one host, the sender writes a ticket's blocks straight into the
    # receiver's cache over CUDA IPC (kvtransfer/ipc.py) instead of sending UCX payloads. Either
    # side turning it off keeps every transfer on UCX.
    direct_writes: bool = True
    # Direct writes' AskWrite, Granted (with the block ids inline), Written and Done over a Unix
    # socket between the two transports' loops instead of UCX control frames (kvtransfer/side.py:
    # ~0.4 ms a frame on their critical path). Either side turning it off keeps them on UCX.
    side_channel: bool = True
    record_timeline: bool = False  # stamp each step of every ticket (kvtransfer.timeline): for benchmarks
    # The transport's threads run their torch ops (packs, unpacks) on one OpenMP thread, starting
    # no OpenMP pool: set by a CPU worker, whose step thread keeps the process's only pool
    # (engine.cpu_threads.one_thread_here says why).
    one_torch_thread: bool = False

    def __post_init__(self) -> None:
        if self.message_bytes < 1 or self.max_inflight_recv < 1:
            raise ValueError("message_bytes and max_inflight_recv must be positive")
        if self.checksum_samples < 0:
            raise ValueError(f"checksum_samples is {self.checksum_samples}; use 0 (off) or a positive count")

    @property
    def progress_mode(self) -> ProgressMode:
        if self.progress is not None:
            return self.progress
        return ProgressMode.THREAD_POLLING if self.device.startswith("cuda") else ProgressMode.THREAD

    @property
    def delayed_submission_on(self) -> bool:
        if self.delayed_submission is not None:
            return self.delayed_submission
        return not self.device.startswith("cuda")

    @property
    def direct_writes_on(self) -> bool:
        """Direct writes are possible at all: switched on, and KV (so staging) on a GPU."""
        return self.direct_writes and self.device.startswith("cuda")

    @property
    def accepts_loopback_only(self) -> bool:
        return is_loopback(self.host) if self.loopback_only is None else self.loopback_only

    @property
    def names_intra_node_transport(self) -> bool:
        """Whether ucx_tls asks for a same-host transport (cuda_ipc, shared memory).

        Those only work without the loopback lock-down above: with CM_USE_ALL_DEVICES off, UCX
        wires every peer up over the one tcp device it connected on, so it sees even a peer on
        this host as remote and never uses them. For cuda_ipc that meant KV between two GPU
        workers went through host memory over tcp at ~0.4 GB/s instead of 100s over NVLink
        (measured on an H100, 2026-11-25), so the lock-down yields; the handshake still refuses
        connections that arrive on any other address (transport.py).
        """
        names = {t.strip() for t in (self.ucx_tls or "").split(",")}
        return bool(names & _INTRA_NODE_TLS)

    @property
    def ucx_init_options(self) -> dict[str, str]:
        # A restarted worker binds its port again even while the dead one's connections linger.
        options = {"CM_REUSEADDR": "y"}
        if self.accepts_loopback_only and not self.names_intra_node_transport:
            # UCX's data listeners and lanes on the loopback device only; wire-up must then not
            # look for other devices (CM_USE_ALL_DEVICES), or it fails with "unreachable".
            options |= {"NET_DEVICES": loopback_device(), "CM_USE_ALL_DEVICES": "n"}
        if self.ucx_tls is not None:
            options["TLS"] = self.ucx_tls
        return options | dict(self.ucx_options)

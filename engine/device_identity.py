"""Which physical device an engine computes on, as the scheduler compares workers by.

Two worker processes on one GPU (`pdmesh up` on a one-GPU host puts the prefill and the decode
worker there) time-slice it: a prompt computed by one is device time the other's decode steps do
not get. The scheduler forecasts such co-resident workers' work as competing for one device
(services/scheduler/forecast.py, DeviceLoad), so each worker names its device: the host and the
GPU's UUID, which is the same whatever CUDA_VISIBLE_DEVICES calls it in each process.

A CPU worker names none. Each runs its own torch threads (`--threads`), and the OS runs workers
in parallel while the host has cores for them all; where it has not, the contention shows in every
worker's measured steps, which the scheduler's step models are fitted to. One worker's prompt does
not wait for another's the way kernels queued on one GPU do.
"""

from __future__ import annotations

import socket

import torch


def device_identity(device: torch.device) -> str:
    """"<host>/<GPU UUID>" for a CUDA device; "" (shares with no one) for any other."""
    if device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"{socket.gethostname()}/{torch.cuda.get_device_properties(index).uuid}"

"""What a worker registers as its device (WorkerInfo.device_id): a GPU's host and UUID, the same
whatever the process calls it; none for a CPU, whose workers do not queue behind each other."""

from __future__ import annotations

import socket

import pytest
import torch

from engine.device_identity import device_identity


def test_a_cpu_names_no_shared_device() -> None:
    assert device_identity(torch.device("cpu")) == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_is_named_by_host_and_uuid_whatever_the_index_is_called() -> None:
    current = torch.cuda.current_device()
    named = device_identity(torch.device(f"cuda:{current}"))
    assert named == device_identity(torch.device("cuda"))  # "cuda" is the current device
    host, uuid = named.split("/", 1)
    assert host == socket.gethostname() and uuid == str(torch.cuda.get_device_properties(current).uuid)

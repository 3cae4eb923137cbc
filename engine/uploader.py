"""A step's host arrays onto the device in one copy, queued without waiting.

Each torch call on the step thread costs host time while the device idles between steps, and each
one releases the GIL, a point where the step thread may have to wait for the service's event loop
to hand it back. So the step's arrays (int64 ids, positions, slots, rows; the int32 block table and
lengths) are packed with numpy into one pinned staging buffer and copied in one non-blocking
transfer; the device tensors are views of that one copy. Staging buffers are kept and reused in
turn (pinning a fresh one costs ~0.4 ms); a reused one waits, if ever, for the copy that last read
it. On CPU the arrays are used as they are.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes: each array may be viewed as int64, and Triton specialises 16-byte aligned pointers
_SLOTS = 4  # staging buffers in turn: a step's copy may still be reading one while the next fills another
_MIN_BYTES = 1 << 16


class Uploader:
    def __init__(self, device: torch.device, stage: bool | None = None) -> None:
        self.device = device
        self.stage = device.type == "cuda" if stage is None else stage  # tests stage on CPU too
        self._buffers: list[tuple[torch.Tensor, np.ndarray] | None] = [None] * _SLOTS  # uint8 (pinned on CUDA)
        self._copied: list[torch.cuda.Event | None] = [None] * _SLOTS
        self._next = 0

    def __call__(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Each array on the device (C-contiguous arrays, shapes kept); one copy for all of them."""
        if not self.stage:
            return [torch.from_numpy(a) for a in arrays]
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        slot, buffer, host = self._staging(max(end, _ALIGN))
        for a, at in zip(arrays, offsets, strict=True):
            host[at : at + a.nbytes].view(a.dtype)[:] = a.ravel()
        device = buffer[: max(end, _ALIGN)].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the copy's stream: its device's, not the thread's
            self._copied[slot] = event
        return [
            device[at : at + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
            for a, at in zip(arrays, offsets, strict=True)
        ]

    def _staging(self, nbytes: int) -> tuple[int, torch.Tensor, np.ndarray]:
        """The next staging buffer (its slot, as a tensor and as an array), at least nbytes, once no
        copy reads it any more."""
        slot, self._next = self._next, (self._next + 1) % _SLOTS
        entry, copied = self._buffers[slot], self._copied[slot]
        if copied is not None:
            if not copied.query():  # done long ago, as a rule: query() keeps the GIL, synchronize() releases it
                copied.synchronize()
            self._copied[slot] = None
        if entry is None or entry[0].numel() < nbytes:
            pinned = self.device.type == "cuda"
            buffer = torch.empty(max(nbytes, _MIN_BYTES), dtype=torch.uint8, pin_memory=pinned)
            entry = self._buffers[slot] = (buffer, buffer.numpy())
        return slot, *entry


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}

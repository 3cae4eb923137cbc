"""A ticket's block ids inline in a grant (kvtransfer/block_ids.py): what the receiver encodes the
writer decodes exactly, and anything else is refused rather than written with. On CUDA the pinned
buffers are reused only once the copy that read each has run; on the CPU the ids come back as they are."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from kvtransfer.block_ids import PinnedIds, decode_ids, encode_ids


def test_ids_survive_their_encoding() -> None:
    ids = torch.tensor([0, 7, 2**40, 3], dtype=torch.int64)
    assert decode_ids(encode_ids(ids), 4).tolist() == [0, 7, 2**40, 3]


@pytest.mark.parametrize(
    ("text", "count", "message"),
    [
        (base64.b64encode(np.arange(3, dtype="<i8").tobytes()).decode(), 4, "3 block ids for a ticket of 4"),
        (base64.b64encode(b"\0" * 12).decode(), 1, "1.5 block ids"),
        ("not base64!", 1, "not base64"),
    ],
)
def test_ids_that_do_not_match_the_ticket_are_refused(text: str, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_ids(text, count)


def test_on_the_cpu_ids_come_back_as_a_tensor_of_their_own() -> None:
    source = [5, 2, 7]
    ids = PinnedIds(torch.device("cpu")).upload(source)
    source[0] = 9
    assert ids.dtype == torch.int64 and ids.tolist() == [5, 2, 7]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_pinned_buffer_is_not_refilled_while_a_queued_copy_still_reads_it() -> None:
    """More uploads than kept buffers, all queued behind a stalled stream: a buffer refilled before
    its copy ran would hand a later upload's ids to an earlier one."""
    device = torch.device("cuda")
    uploader = PinnedIds(device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(500_000_000)  # ~0.3 s of spinning: every copy below waits behind it
        lists = [[i * 100 + j for j in range(1 + i)] for i in range(10)]  # more than the 4 kept buffers
        uploaded = [uploader.upload(ids) for ids in lists]
    stream.synchronize()
    assert [ids.tolist() for ids in uploaded] == lists

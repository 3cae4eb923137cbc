"""The same-host side channel (kvtransfer/side.py) on a real abstract Unix socket, without a GPU:
a dialer is bound to exactly the connection its token was made for, in either order of arrival;
only AskWrite and Written go to the listener and only Granted (with the block ids inline) and Done
come back; anything else, a frame over the bound, or a closed end, takes the channel down and
reports it, and a message over the bound is refused before it is written. The receiver's grants
over it are in test_grant_rule.py; direct writes over it run in test_direct_gpu.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from kvtransfer import side
from kvtransfer.block_ids import decode_ids, encode_ids
from kvtransfer.side import SideChannel, SideListener, dial_side
from kvtransfer.wire import AskWrite, Cancel, Done, Granted, Message, Written


class Bound:
    """What one bound end heard: messages, and why it was lost."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lost: list[str] = []

    def attach(self, channel: SideChannel) -> None:
        channel.bind(self.messages.append, self.lost.append)


def run(scenario: Callable[[SideListener], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        listener = SideListener(asyncio.get_running_loop())
        assert await listener.start()
        try:
            return await scenario(listener)
        finally:
            listener.close()

    return asyncio.run(main())


async def settle(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


def test_written_and_done_cross_the_channel_of_the_connection_the_token_was_made_for() -> None:
    async def scenario(listener: SideListener) -> tuple[list[Message], list[Message], list[Message]]:
        mine, other, dialer = Bound(), Bound(), Bound()
        token = listener.offer()
        listener.expect(token, mine.attach)
        listener.expect(listener.offer(), other.attach)
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        dialer.attach(channel)
        channel.send(Written("t1", 4096, checksums=((3, 7),)))
        channel.send(Written("t2", 8192))
        await settle(lambda: len(mine.messages) == 2)
        return mine.messages, other.messages, dialer.messages

    mine, other, _ = run(scenario)
    assert mine == [Written("t1", 4096, checksums=((3, 7),)), Written("t2", 8192)] and other == []


def test_a_dialer_that_arrives_before_its_connection_is_registered_is_bound_when_it_is() -> None:
    async def scenario(listener: SideListener) -> list[Message]:
        bound, dialer = Bound(), Bound()
        token = listener.offer()
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        dialer.attach(channel)
        channel.send(Written("early", 16))  # held until the binding
        await asyncio.sleep(0.05)
        listener.expect(token, bound.attach)
        await settle(lambda: bool(bound.messages))
        return bound.messages

    assert run(scenario) == [Written("early", 16)]


def test_done_comes_back_to_the_dialer() -> None:
    async def scenario(listener: SideListener) -> list[Message]:
        ends: list[SideChannel] = []
        token = listener.offer()
        listener.expect(token, lambda ch: (ends.append(ch), ch.bind(lambda m: None, lambda r: None)))
        dialer = Bound()
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        dialer.attach(channel)
        await settle(lambda: bool(ends))
        ends[0].send(Done("t1", 4096))
        await settle(lambda: bool(dialer.messages))
        return dialer.messages

    assert run(scenario) == [Done("t1", 4096)]


def test_a_message_of_another_kind_takes_the_channel_down_and_both_ends_hear_it() -> None:
    async def scenario(listener: SideListener) -> tuple[Bound, Bound]:
        bound, dialer = Bound(), Bound()
        token = listener.offer()
        listener.expect(token, bound.attach)
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        dialer.attach(channel)
        channel.send(Cancel("t1", "no"))  # Cancel keeps UCX: on the side channel it is a fault
        await settle(lambda: bool(bound.lost) and bool(dialer.lost))
        return bound, dialer

    bound, dialer = run(scenario)
    assert bound.messages == [] and bound.lost and dialer.lost


def test_a_token_that_names_no_connection_is_closed(monkeypatch: Any) -> None:
    monkeypatch.setattr(side, "_BIND_S", 0.1)

    async def scenario(listener: SideListener) -> list[str]:
        dialer = Bound()
        channel = await dial_side(listener.name, listener.offer(), 5.0)  # offered, never expected
        assert channel is not None
        dialer.attach(channel)
        await settle(lambda: bool(dialer.lost))
        return dialer.lost

    assert run(scenario)


def test_a_socket_that_is_not_there_leaves_the_connection_on_ucx() -> None:
    async def scenario(listener: SideListener) -> SideChannel | None:
        return await dial_side("\0pdmesh-kv-nobody-listens-here", listener.offer(), 1.0)

    assert run(scenario) is None


def test_a_written_sent_from_another_thread_arrives_whole_and_a_closed_end_refuses_to_send() -> None:
    """A direct writer sends its Written from the thread that saw its copies finish, not the loop."""

    async def scenario(listener: SideListener) -> tuple[list[Message], str]:
        bound, dialer = Bound(), Bound()
        token = listener.offer()
        listener.expect(token, bound.attach)
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        dialer.attach(channel)
        await asyncio.gather(*(asyncio.to_thread(channel.send, Written(f"t{i}", 16 * i)) for i in range(20)))
        await settle(lambda: len(bound.messages) == 20)
        channel.close()
        try:
            await asyncio.to_thread(channel.send, Written("late", 16))
        except ConnectionError as e:
            return bound.messages, str(e)
        return bound.messages, ""

    messages, refusal = run(scenario)
    assert sorted(m.ticket for m in messages) == sorted(f"t{i}" for i in range(20))  # type: ignore[attr-defined]
    assert "closed" in refusal


async def bound_pair(listener: SideListener) -> tuple[SideChannel, Bound, SideChannel, Bound]:
    """(the listener's end, what it heard, the dialer's end, what it heard), bound both ways."""
    ends: list[SideChannel] = []
    listening, dialer = Bound(), Bound()
    token = listener.offer()
    listener.expect(token, lambda ch: (ends.append(ch), listening.attach(ch)))
    channel = await dial_side(listener.name, token, 5.0)
    assert channel is not None
    dialer.attach(channel)
    await settle(lambda: bool(ends))
    return ends[0], listening, channel, dialer


def test_an_ask_goes_to_the_listener_and_its_grant_comes_back_with_16k_tokens_of_block_ids_intact() -> None:
    ids = random.Random(3).sample(range(1 << 20), 1024)  # 16k tokens at 16 a block

    async def scenario(listener: SideListener) -> tuple[list[Message], list[Message]]:
        listening_end, listening, dialer_end, dialer = await bound_pair(listener)
        dialer_end.send(AskWrite("t1"))
        await settle(lambda: bool(listening.messages))
        listening_end.send(Granted("t1", True, block_ids=encode_ids(torch.tensor(ids))))
        await settle(lambda: bool(dialer.messages))
        return listening.messages, dialer.messages

    asked, granted = run(scenario)
    assert asked == [AskWrite("t1")]
    assert [(g.ticket, g.direct, g.tag) for g in granted] == [("t1", True, 0)]  # type: ignore[attr-defined]
    assert decode_ids(granted[0].block_ids, len(ids)).tolist() == ids  # type: ignore[attr-defined]


def test_a_message_over_the_bound_is_refused_unwritten_and_the_channel_stays_up() -> None:
    too_many = torch.arange(side._MAX_BODY // 8 + 1)  # their base64 alone is over the bound

    async def scenario(listener: SideListener) -> tuple[str, list[Message], list[str]]:
        listening_end, _, _, dialer = await bound_pair(listener)
        refusal = ""
        try:
            listening_end.send(Granted("t1", True, block_ids=encode_ids(too_many)))
        except ValueError as e:
            refusal = str(e)
        listening_end.send(Done("t2", 16))
        await settle(lambda: bool(dialer.messages))
        return refusal, dialer.messages, dialer.lost

    refusal, heard, lost = run(scenario)
    assert f"exceeds the side channel's {side._MAX_BODY}" in refusal
    assert heard == [Done("t2", 16)] and lost == []


def test_a_frame_that_announces_more_than_the_bound_takes_the_channel_down() -> None:
    async def scenario(listener: SideListener) -> tuple[Bound, Bound]:
        _, listening, dialer_end, dialer = await bound_pair(listener)
        dialer_end.send_raw(side._LENGTH.pack(side._MAX_BODY + 1) + b"{")
        await settle(lambda: bool(listening.lost) and bool(dialer.lost))
        return listening, dialer

    listening, dialer = run(scenario)
    assert listening.messages == [] and listening.lost and dialer.lost


@pytest.mark.parametrize("message", [Granted("t1", True, block_ids="AAAAAAAAAAA="), Done("t1", 16)])
def test_what_only_the_dialer_may_hear_sent_to_the_listener_takes_the_channel_down(message: Message) -> None:
    async def scenario(listener: SideListener) -> tuple[Bound, Bound]:
        _, listening, dialer_end, dialer = await bound_pair(listener)
        dialer_end.send(message)
        await settle(lambda: bool(listening.lost) and bool(dialer.lost))
        return listening, dialer

    listening, _ = run(scenario)
    assert listening.messages == []


def test_a_full_buffer_refuses_a_message_unwritten_and_the_channel_carries_on_once_read() -> None:
    """A burst of grants with their ids that the dialer has not read yet: the next one is refused
    whole (its sender sends it over UCX instead), never cut, and the channel stays up."""
    grant = Granted("t", True, block_ids=encode_ids(torch.arange(side.MAX_INLINE_IDS)))

    async def scenario(listener: SideListener) -> tuple[int, str, list[Message], list[str], list[str]]:
        listening_end, listening, dialer_end, dialer = await bound_pair(listener)
        sent, refusal = 0, ""
        while not refusal:  # the loop does not run meanwhile: nobody reads the dialer's end
            try:
                listening_end.send(grant)
                sent += 1
            except side.ChannelFull as e:
                refusal = str(e)
        await settle(lambda: len(dialer.messages) == sent)
        listening_end.send(Done("t", 16))
        await settle(lambda: len(dialer.messages) == sent + 1)
        return sent, refusal, dialer.messages, dialer.lost, listening.lost

    sent, refusal, heard, dialer_lost, listening_lost = run(scenario)
    assert sent > 0 and "full" in refusal
    assert heard == [grant] * sent + [Done("t", 16)] and dialer_lost == [] and listening_lost == []

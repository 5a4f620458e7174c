"""The worker channel on a real socket pair: framing, buffering, partial messages, EOF."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from trt_heartbeat.exporter.channel import Channel


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel, socket.socket]]:
    a, b = socket.socketpair()
    yield Channel(a.fileno()), Channel(b.fileno()), a
    a.close()
    b.close()


def test_messages_arrive_one_at_a_time_and_in_order(
    pair: tuple[Channel, Channel, socket.socket],
) -> None:
    left, right, _ = pair
    big = bytes(range(256)) * 1024  # more than one read brings, and than the socket holds
    messages = ("wake", ("ok", b"\x00" * 512, (8, 16)), big, None)

    def write() -> None:
        for message in messages:
            left.send(message)

    writer = threading.Thread(target=write)
    writer.start()
    assert right.poll(5.0)
    assert [right.recv() for _ in range(4)] == list(messages)
    writer.join()
    assert not right.poll()
    assert not right.spin(0.001)


def test_a_partial_message_is_not_ready_and_poll_never_blocks(
    pair: tuple[Channel, Channel, socket.socket],
) -> None:
    _, right, raw = pair
    data = pickle.dumps(("ok", 1))
    raw.sendall(struct.pack("!I", len(data)) + data[:3])
    assert not right.poll(0.05), "half a message"
    raw.sendall(data[3:])
    assert right.poll(1.0)
    assert right.recv() == ("ok", 1)


def test_the_end_of_the_pipe_is_ready_and_raises_eof(
    pair: tuple[Channel, Channel, socket.socket],
) -> None:
    _, right, raw = pair
    raw.shutdown(socket.SHUT_WR)
    assert right.poll(1.0)
    with pytest.raises(EOFError):
        right.recv()

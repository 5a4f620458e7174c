"""Messages between the exporter and a probe worker: pickled, framed, one write each.

multiprocessing's Connection costs more per small message than the probe's GPU phases take (two
reads per message, a selector built for every poll; docs/performance.md); this reads and
writes the same pipe directly, keeps what a read brought beyond one message, and polls through one
`select.poll` built once.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import time
from typing import Any

_HEADER = struct.Struct("!I")  # the length of the pickled message that follows
_CHUNK = 1 << 16


class Channel:
    """One end of a pipe. Not thread-safe: each end is used by one thread at a time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self._fd, view) :]

    def poll(self, timeout: float = 0.0) -> bool:
        """True when recv() returns at once: a whole message is here, or the other end is gone.
        Reads what has arrived, without blocking; waits at most `timeout` seconds for it."""
        if self._ready():
            return True
        if not self._poll.poll(max(0.0, timeout) * 1000.0):
            return False
        self._read()  # readable: returns at once
        return self._ready()

    def spin(self, seconds: float) -> bool:
        """poll() without sleeping, for up to `seconds`: for an answer due within microseconds,
        where a sleeping wait would add the scheduler's wake-up latency to it."""
        deadline = time.perf_counter() + seconds
        while not self.poll():
            if time.perf_counter() >= deadline:
                return False
        return True

    def recv(self) -> Any:
        """The next message; blocks until it is whole. EOFError once the other end is gone."""
        while (size := self._size()) is None:
            if self._eof:
                raise EOFError("the other end of the channel is closed")
            self._read()
        message = pickle.loads(self._buffer[_HEADER.size : _HEADER.size + size])
        del self._buffer[: _HEADER.size + size]
        return message

    def _read(self) -> None:
        data = os.read(self._fd, _CHUNK)
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _ready(self) -> bool:
        return self._eof or self._size() is not None

    def _size(self) -> int | None:
        """The size of the first message in the buffer, if all of it is there."""
        if len(self._buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        return int(size) if len(self._buffer) >= _HEADER.size + size else None

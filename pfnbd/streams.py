"""Exact-length reads from a trio byte stream.

NBD messages have fixed headers and announced payload lengths, so both phases of a
connection read "exactly n bytes".  One receiver serves the whole connection so that
bytes a client pipelines past the end of negotiation are not lost.
"""

from __future__ import annotations

import trio

# Large enough that one receive usually holds a whole header batch; it bounds what a
# connection buffers beyond the message being read.
RECEIVE_CHUNK = 256 * 1024


class ClientDisconnected(Exception):
    """The client closed its side of the connection (EOF), mid-message or between."""

    def __init__(self, mid_message: bool) -> None:
        super().__init__("client closed the connection" + (" mid-message" if mid_message else ""))
        self.mid_message = mid_message


class Receiver:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, mid_message: bool) -> None:
        data = await self._stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise ClientDisconnected(mid_message or bool(self._buffer))
        self._buffer += data

    async def receive_exactly(self, n: int) -> bytes:
        """The next `n` bytes; use for headers and small payloads."""
        while len(self._buffer) < n:
            await self._fill(mid_message=False)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def receive_into(self, target: memoryview) -> None:
        """Fill `target` completely; large payloads land in it without a copy per chunk."""
        filled = min(len(self._buffer), len(target))
        target[:filled] = self._buffer[:filled]
        del self._buffer[:filled]
        while filled < len(target):
            data = await self._stream.receive_some(min(RECEIVE_CHUNK, len(target) - filled))
            if not data:
                raise ClientDisconnected(mid_message=True)
            target[filled : filled + len(data)] = data
            filled += len(data)

    async def discard(self, n: int) -> None:
        """Skip `n` bytes without holding more than one chunk of them."""
        while n > 0:
            if not self._buffer:
                await self._fill(mid_message=True)
            taken = min(n, len(self._buffer))
            del self._buffer[:taken]
            n -= taken

"""Length-prefixed JSON frames on a pipe: how the session and its worker talk, on fds of their own so that nothing
the program prints on stdout/stderr can be taken for a reply."""

import json
import os
import struct

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 2**20


class ChannelClosed(EOFError):
    """The other end closed the pipe (the worker died, or the session went away)."""


def send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise ChannelClosed("the other end closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> dict:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return json.loads(_read_exactly(fd, size))


def parse(buffer: bytearray) -> dict | None:
    """Take one complete frame off the front of `buffer` (a reader that must not block, such as the session waiting
    with a deadline), or None while it is incomplete."""
    if len(buffer) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack_from(buffer)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    if len(buffer) < _HEADER.size + size:
        return None
    data = bytes(buffer[_HEADER.size:_HEADER.size + size])
    del buffer[:_HEADER.size + size]
    return json.loads(data)

"""Byte streams the JSONL reader reads through: concatenated zstd frames that report a cut-off
file, and the sniffed head of a file followed by the rest of it."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, BinaryIO

import zstandard

# zstd input is fed this much at a time: 256 bytes can expand to at most ~8 MiB (RLE blocks),
# which bounds memory on a pathological line; smaller feeds cost nothing measurable.
_ZSTD_INPUT_BYTES = 256



class ZstdFrames(io.RawIOBase):
    """Decompress concatenated zstd frames; raise EOFError when the last frame is cut off.

    zstandard's stream_reader (even with read_across_frames=True) reports a truncated file as
    a normal end of stream, which would drop the tail silently; decompressobj exposes `eof`
    per frame, so we drive it ourselves.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressobj of the frame in progress, if any
        self._out = memoryview(b"")
        self._error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if self._error is not None:
                raise self._error
            data = self._raw.read(_ZSTD_INPUT_BYTES)
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd stream ends in the middle of a frame")
                return 0
            self._out = memoryview(self._feed(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        parts = []
        try:
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                parts.append(self._frame.decompress(data))
                if self._frame.eof:
                    data = self._frame.unused_data
                    self._frame = None
                else:
                    data = b""
        except zstandard.ZstdError as e:
            # Hand out what decoded cleanly before the damage first; fail on the next read.
            if not parts:
                raise
            self._error = e
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()


class Prefixed(io.RawIOBase):
    """The bytes already read for sniffing, then the rest of the stream (or its read error).

    `read(n)` must return what one underlying read gives (gzip's read1, not read): a read
    that loops to fill n bytes loses everything it decoded when the stream turns out cut.
    """

    def __init__(
        self, head: bytes, read: Callable[[int], bytes], error: BaseException | None
    ) -> None:
        self._head = memoryview(head)
        self._read = read
        self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            data: Any = self._head[: len(buffer)]
            self._head = self._head[len(data) :]
        elif self._error is not None:
            raise self._error
        else:
            data = self._read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

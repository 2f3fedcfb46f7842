"""Hand-made encoded images for the bad-input tests."""
from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of valid PNG structure whose header declares width x height grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")

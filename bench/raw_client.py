"""A lean HTTP/1.1 load generator for JSON POSTs on loopback: one kept-alive asyncio connection per client,
request bytes built by hand, responses read by Content-Length (or chunked). It spends a fraction of
httpx's CPU per request, so on a 2-core machine the cores go to the server being measured.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    async def post(self, path: str, body: Any) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            return status, b"".join(chunks)
        return status, await self.reader.readexactly(int(headers.get("content-length", "0")))

    def close(self) -> None:
        self.writer.close()


async def closed_loop(url: str, path: str, bodies: Sequence[Any], clients: int) -> float:
    """`clients` connections, each sending its share of `bodies` one after another; requests per second."""

    async def one(mine: Sequence[Any]) -> None:
        connection = await RawConnection.open(url)
        try:
            for body in mine:
                status, payload = await connection.post(path, body)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(bodies[c::clients]) for c in range(clients)))
    return len(bodies) / (time.perf_counter() - started)

#!/usr/bin/env python3
"""Acceptance throughput of BDAT (RFC 3030 CHUNKING) against DATA, into the real relay.

N messages of SIZE octets (text: 76-column base64 lines, as an attachment) are sent over
SESSIONS connections kept open (several messages per connection) to a fresh ``twistd -n
mailrelay`` holding its mail (``[queue] hold = true``: spooled with fsync before each 250,
nothing delivered, so only acceptance is measured).  Each run sends them one way:

  data   MAIL, RCPT and DATA pipelined, the 354 awaited, then the dot-stuffed message and
         its end marker (the stuffing is done once, before timing: the client's cost is not
         measured);
  bdat   MAIL, RCPT and the message in BDAT chunks of CHUNK octets (0: one ``BDAT n LAST``),
         all pipelined.

Runs alternate (data, bdat, bdat, data, ... : ABBA, so a drift of the machine weighs on both
the same), each with a fresh relay and spool; the time is from the first connection to the
last 250.  Reported per run and as medians, with the ratio bdat/data.  Not a timed test: a
measurement for the closing note of issue 12.

    .venv/bin/python bench/bdat.py                      # 1 MiB, 200 messages, 3+3 runs
    .venv/bin/python bench/bdat.py --size 100k --messages 1000 --chunk 65536
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import RelayProcess  # noqa: E402


def parseSize(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    text = text.strip().lower()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def makeMessage(size: int) -> bytes:
    """A text message of about C{size} octets: a header, then 76-column base64 lines."""
    head = (b"From: bench@example.com\r\nTo: sink@example.org\r\nSubject: bdat bench\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    encoded = base64.b64encode(random.Random(12).randbytes(size))
    count = max(size - len(head), 0) // 78  # 76 octets and CRLF a line
    return head + b"".join(encoded[i * 76:(i + 1) * 76] + b"\r\n" for i in range(count))


def dotStuff(message: bytes) -> bytes:
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class Session:
    """One SMTP connection sending messages one after the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> bytes:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the relay closed the connection")
            if line[3:4] != b"-":
                return line

    async def expect(self, code: bytes, n: int = 1) -> None:
        for _ in range(n):
            line = await self.reply()
            if not line.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {line!r}")

    async def data(self, envelope: bytes, stuffed: bytes) -> None:
        self.writer.write(envelope + b"DATA\r\n")
        await self.expect(b"250", 2)
        await self.expect(b"354")
        self.writer.write(stuffed)
        await self.expect(b"250")

    async def bdat(self, envelope: bytes, chunks: list[bytes]) -> None:
        self.writer.write(envelope + b"".join(chunks))
        await self.expect(b"250", 2 + len(chunks))


def chunksOf(message: bytes, chunk: int) -> list[bytes]:
    if chunk <= 0 or chunk >= len(message):
        return [b"BDAT %d LAST\r\n" % len(message) + message]
    pieces = [message[i:i + chunk] for i in range(0, len(message), chunk)]
    return [b"BDAT %d%s\r\n" % (len(p), b" LAST" if i == len(pieces) - 1 else b"") + p
            for i, p in enumerate(pieces)]


async def send(port: int, way: str, messages: int, sessions: int, message: bytes,
               chunk: int) -> float:
    """Send C{messages} over C{sessions} connections; the seconds it took."""
    envelope = b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\n"
    stuffed = dotStuff(message)
    chunks = chunksOf(message, chunk)
    counts = [messages // sessions + (i < messages % sessions) for i in range(sessions)]

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        s = Session(reader, writer)
        await s.expect(b"220")
        writer.write(b"EHLO bench.example\r\n")
        await s.expect(b"250")
        for _ in range(count):
            if way == "data":
                await s.data(envelope, stuffed)
            else:
                await s.bdat(envelope, chunks)
        writer.write(b"QUIT\r\n")
        await s.expect(b"221")
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one(c) for c in counts if c))
    return time.monotonic() - start


def run(args: argparse.Namespace, way: str, index: int, message: bytes) -> float:
    directory = Path(tempfile.mkdtemp(prefix=f"bdat-{way}-{index}-", dir=args.workdir))
    relay = RelayProcess(directory, "[queue]\nhold = true\n")
    try:
        relay.start()
        seconds = asyncio.run(send(relay.port, way, args.messages, args.sessions, message,
                                   args.chunk))
        queued = len(relay.queued())
        if queued != args.messages:
            raise RuntimeError(f"{way}: {queued} messages queued, not {args.messages}:\n"
                               f"{relay.log()[-2000:]}")
        return seconds
    finally:
        relay.stop()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1m", help="message size (default 1m)")
    parser.add_argument("--messages", type=int, default=200, help="messages per run")
    parser.add_argument("--sessions", type=int, default=10, help="parallel connections")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way")
    parser.add_argument("--chunk", type=parseSize, default=0,
                        help="BDAT chunk size (default 0: the whole message in one BDAT LAST)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the spools go (a disk)")
    parser.add_argument("--keep", action="store_true", help="keep the spools and logs")
    args = parser.parse_args(argv)
    size = parseSize(args.size)
    message = makeMessage(size)
    order = [("data", "bdat"), ("bdat", "data")]
    times: dict[str, list[float]] = {"data": [], "bdat": []}
    print(f"{args.messages} messages of {len(message)} octets, {args.sessions} sessions, "
          f"BDAT chunk {args.chunk or 'whole message'}, {os.cpu_count()} CPUs")
    for i in range(args.repeat):
        for way in order[i % 2]:
            seconds = run(args, way, i, message)
            times[way].append(seconds)
            print(f"  {way:4}  {seconds:7.2f} s  {args.messages / seconds:7.1f} msg/s  "
                  f"{args.messages * len(message) / seconds / 2**20:7.1f} MiB/s", flush=True)
    rate = {way: args.messages / statistics.median(t) for way, t in times.items()}
    print(f"median: data {rate['data']:.1f} msg/s, bdat {rate['bdat']:.1f} msg/s; "
          f"bdat/data = {rate['bdat'] / rate['data']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

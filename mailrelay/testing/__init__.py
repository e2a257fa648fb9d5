"""The public test kit, for mailrelay's tests and for site plugin authors: an SMTP
listener (L{harness}) and a queue manager with its delivery backends (L{queueharness}), in
memory.

    from mailrelay.testing import MemorySpool, QueueHarness, ServerHarness

May import every package but L{mailrelay.app}.
"""

from mailrelay.spool.memory import MemorySpool
from mailrelay.testing.harness import (
    FakeTLSConnection,
    MemoryChecker,
    ServerHarness,
    TLSStringTransport,
)
from mailrelay.testing.queueharness import QueueHarness

__all__ = [
    "FakeTLSConnection",
    "MemoryChecker",
    "MemorySpool",
    "QueueHarness",
    "ServerHarness",
    "TLSStringTransport",
]

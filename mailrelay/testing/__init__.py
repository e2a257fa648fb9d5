"""The public test kit, for mailrelay's tests and for site plugin authors (L{harness}).

    from mailrelay.testing import MemorySpool, ServerHarness

May import every package but L{mailrelay.app}.
"""

from mailrelay.spool.memory import MemorySpool
from mailrelay.testing.harness import (
    FakeTLSConnection,
    MemoryChecker,
    ServerHarness,
    TLSStringTransport,
)

__all__ = [
    "FakeTLSConnection",
    "MemoryChecker",
    "MemorySpool",
    "ServerHarness",
    "TLSStringTransport",
]

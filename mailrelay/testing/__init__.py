"""The public test kit, for mailrelay's tests and for site plugin authors: an SMTP
listener (L{harness}), a queue manager with its delivery backends (L{queueharness}), in
memory; plugins built as the relay builds them and the objects they are given
(L{plugins}); a DNS resolver (L{resolver}) and an SMTP/LMTP next hop (L{nexthop}) in memory.

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
from mailrelay.testing.nexthop import FakeNexthop, ReceivedMessage
from mailrelay.testing.plugins import (
    RecordingObserver,
    buildPlugin,
    hookPlugins,
    makeClient,
    makeDeliveryEvent,
    makeEnvelope,
    makeFilterContext,
    makePluginContext,
    makeStampContext,
)
from mailrelay.testing.queueharness import QueueHarness
from mailrelay.testing.resolver import SERVFAIL, FakeResolver

__all__ = [
    "SERVFAIL",
    "FakeNexthop",
    "FakeResolver",
    "FakeTLSConnection",
    "MemoryChecker",
    "MemorySpool",
    "QueueHarness",
    "ReceivedMessage",
    "RecordingObserver",
    "ServerHarness",
    "TLSStringTransport",
    "buildPlugin",
    "hookPlugins",
    "makeClient",
    "makeDeliveryEvent",
    "makeEnvelope",
    "makeFilterContext",
    "makePluginContext",
    "makeStampContext",
]

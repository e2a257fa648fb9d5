"""The spool: the durable message store behind L{mailrelay.interfaces.ISpool}; nothing
accepted is ever lost.

Modules:

  - L{store}: L{Spool}, the spool directory (layout, recovery, reading, the group committer);
  - L{writer}: L{MessageWriter}, one message being written;
  - L{commit}: the durable operations and how a batch of them is made durable;
  - L{ids}: queue ids;
  - L{memory}: L{MemorySpool <mailrelay.spool.memory.MemorySpool>}, a spool in memory for
    tests.

Every event of the spool is logged in the namespace C{mailrelay.spool}.  The package may
import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.spool.ids import isQueueID, newQueueID
from mailrelay.spool.store import REMOVAL_SYNC_DELAY, Spool
from mailrelay.spool.writer import MessageWriter

__all__ = [
    "REMOVAL_SYNC_DELAY",
    "CorruptEntry",
    "EntryGone",
    "MessageWriter",
    "Spool",
    "SpoolError",
    "isQueueID",
    "newQueueID",
]

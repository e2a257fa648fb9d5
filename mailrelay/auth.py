"""Moved to L{mailrelay.receive.auth}: this old name is an alias of the same module object.

Public: docs/plugins.md, examples or stale C{dropin.cache} files name this path,
so it stays for good.  Nothing under C{mailrelay/} imports it.
"""

import sys

from mailrelay.receive import auth as _moved
from mailrelay.receive.auth import *  # noqa: F403  (for type checkers and help())

sys.modules[__name__] = _moved

"""Moved to L{mailrelay.receive.rdns}: this old name is an alias of the same module object.

Internal: it stays only until the tests import the new path.  Nothing under C{mailrelay/}
imports it.
"""

import sys

from mailrelay.receive import rdns as _moved
from mailrelay.receive.rdns import *  # noqa: F403  (for type checkers and help())

sys.modules[__name__] = _moved

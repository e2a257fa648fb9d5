"""Moved to L{mailrelay.app.relay}: this old name is an alias of the same module object.

Internal: it stays only until the tests import the new path.  Nothing under C{mailrelay/}
imports it.
"""

import sys

from mailrelay.app import relay as _moved
from mailrelay.app.relay import *  # noqa: F403  (for type checkers and help())

sys.modules[__name__] = _moved

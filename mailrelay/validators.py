"""Moved to L{mailrelay.policy.validators}: this old name is an alias of the same module object.

Public: docs/plugins.md, examples or stale C{dropin.cache} files name this path,
so it stays for good.  Nothing under C{mailrelay/} imports it.
"""

import sys

from mailrelay.policy import validators as _moved
from mailrelay.policy.validators import *  # noqa: F403  (for type checkers and help())

sys.modules[__name__] = _moved

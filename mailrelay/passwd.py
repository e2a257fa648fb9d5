"""Moved to L{mailrelay.app.passwd}: this old name is an alias of the same module object.

Public: C{python -m mailrelay.passwd} (README) still runs the command, and
C{from mailrelay.passwd import ...} still works.  Nothing under C{mailrelay/} imports it.
"""

import sys

from mailrelay.app import passwd as _moved
from mailrelay.app.passwd import *  # noqa: F403  (for type checkers and help())

if __name__ == "__main__":  # python -m mailrelay.passwd
    sys.exit(_moved.main())
else:
    sys.modules[__name__] = _moved

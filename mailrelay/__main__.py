"""C{python -m mailrelay}: the C{mailrelay} command (L{mailrelay.app.cli})."""

import sys

from mailrelay.app.cli import main

if __name__ == "__main__":
    sys.exit(main())

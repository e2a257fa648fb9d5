"""The one way into the spool: header processing and stampers (L{stamping}).

Every message, received by SMTP or made by the relay (a DSN), is to enter the spool through
this package: open, header processing, stampers, hop check, commit, notify the queue.

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.  This file imports nothing.
"""

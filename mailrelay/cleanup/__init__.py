"""The one way into the spool: the intake (L{intake}), with header processing and the header
stampers (L{stamping}).

Every message, received by SMTP or made by the relay (a DSN), enters the spool through
L{intake.Intake}: open, header processing, stampers, hop check, filters, commit, notify the
queue.

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}: the spool is reached through
L{mailrelay.interfaces.ISpool} only.  This file imports nothing.
"""

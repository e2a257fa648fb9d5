"""The SMTP protocol engines, sans-IO: the server session (L{server}), the client session
(L{client}), the wire format both use (L{wire}), the replies (L{replies}), the client's
settings (L{clientsettings}) and errors (L{errors}).  They turn bytes into events and answers
into bytes; the Twisted adapters that move the bytes live in L{mailrelay.receive} and
L{mailrelay.delivery}.

May import only each other and the values (L{mailrelay.interfaces}, L{mailrelay.envelope},
L{mailrelay.errors}, L{mailrelay.address}): no Twisted and no TLS library.  This file
imports nothing.
"""

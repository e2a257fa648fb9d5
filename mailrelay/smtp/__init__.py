"""The SMTP protocol engines, sans-IO: the server session (L{server}), the client session
(L{client}) and the replies (L{replies}).  They turn bytes into events and answers into bytes;
the Twisted adapters that move the bytes live in L{mailrelay.receive} and L{mailrelay.delivery}.

May import only each other and the values (L{mailrelay.interfaces}, L{mailrelay.envelope},
L{mailrelay.errors}, L{mailrelay.address}), and no C{twisted} or C{OpenSSL} (L{client} still
does, until its Twisted half moves to L{mailrelay.delivery}).  This file imports nothing.
"""

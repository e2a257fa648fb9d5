"""The inbound edge on Twisted: what happens between an SMTP client and the intake.

  - L{listener}: one listener's settings and the builder of its factory (the relay's and
    the test kit's);
  - L{protocol}: the Twisted protocol driving the sans-IO L{mailrelay.smtp.server};
  - L{auth}: AUTH (password file, cred checker/realm/portal, failure throttle);
  - L{limits}: abuse limits (connection and message counts and rates);
  - L{tls}: server certificates and SNI; L{proxy}: the PROXY protocol; L{rdns}: reverse DNS.

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}), L{mailrelay.smtp} and L{mailrelay.policy}.  This file imports nothing.
"""

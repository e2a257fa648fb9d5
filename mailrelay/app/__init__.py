"""Composition roots: where the stages are built and wired together.

  - L{relay}: the relay process (spool, backends, queue or delivery process, listeners;
    ordered stop, SIGHUP reload);
  - L{deliveryprocess}: the delivery process (C{python -m mailrelay.app.deliveryprocess});
  - L{plugins}: plugin discovery and building;
  - L{tap}: the C{twistd mailrelay} command; L{passwd}: the C{mailrelay-passwd} command;
    L{sendmail}: the C{mailrelay-sendmail} command, with L{localmail}, the message it makes.

May import every package.  Nothing imports C{app/} (the dropin names L{tap} only as a
string).  This file imports nothing, so importing one module does not drag in the others.
"""

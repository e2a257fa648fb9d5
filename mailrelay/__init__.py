"""mailrelay: a Twisted-based, pluggable, durable mail relay."""

__version__ = "0.1.0"

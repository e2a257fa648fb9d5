"""Recipient policy: relay control and the validator chain (L{chain}), and the built-in
validators (L{validators}).

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.policy.chain import ConfiguredValidator, RecipientPolicy, RelayControl

__all__ = ["ConfiguredValidator", "RecipientPolicy", "RelayControl"]

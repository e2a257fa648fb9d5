"""Policy: the checks of the SMTP stages.  Relay control and the recipient validator chain
(L{chain}), the MAIL stage's checks (L{sender}: sender binding, message rates, free space),
and the built-in validators (L{validators}).

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.policy.chain import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.policy.sender import SenderPolicy

__all__ = ["ConfiguredValidator", "RecipientPolicy", "RelayControl", "SenderPolicy"]

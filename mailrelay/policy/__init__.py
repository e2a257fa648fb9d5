"""Policy: the checks of the SMTP stages.  The one chain runner of every verdict hook
(L{runner}: L{PolicyChain}), relay control and the recipient validator chain (L{chain}), the
MAIL stage's checks (L{sender}: the built-in sender validators, sender binding, message rates
and free space, before the site's), and the built-in recipient validators (L{validators}).

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.policy.chain import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.policy.runner import ConfiguredPlugin, PolicyChain
from mailrelay.policy.sender import SenderPolicy

__all__ = [
    "ConfiguredPlugin",
    "ConfiguredValidator",
    "PolicyChain",
    "RecipientPolicy",
    "RelayControl",
    "SenderPolicy",
]

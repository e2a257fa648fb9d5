"""What one delivery attempt means for a message's recipients."""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay.envelope import Recipient
from mailrelay.interfaces import RecipientResult

__all__ = ["Outcome"]


@dataclass(frozen=True)
class Outcome:
    """One recipient's result in one attempt, and where it went (for the log).

    @ivar recipient: the envelope's recipient.
    @ivar result: what the backend (or the attempt, for a failure of its own) said.
    @ivar relay: the next hop, as logged (C{relay=}).
    """

    recipient: Recipient
    result: RecipientResult
    relay: str

"""The queue: delivers what the spool holds, retries, bounces and expires it (Postfix's qmgr).

Modules:

  - L{manager}: L{QueueManager}, the service that schedules and delivers every entry;
  - L{scheduler}: when each entry is next looked at, and which are active;
  - L{attempt}: one delivery attempt (route, group by route, deliver with timeouts);
  - L{outcome}: what an attempt means for the recipients, a pure function;
  - L{notify}: submitting the notifications an attempt owes to the intake;
  - L{policy}: L{QueuePolicy} (retry, expiry, notification settings) and the back-off;
  - L{dsn}: the content of delivery status notifications (RFC 3464);
  - L{lock}: one queue manager per spool.

Every event of the queue is logged in the namespace C{mailrelay.queue}.  The package may
import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}; it reaches the spool only through
L{mailrelay.interfaces.ISpool}; the entries it makes (notifications) enter the spool through
L{mailrelay.interfaces.IIntake}, like any message.
"""

from mailrelay.queue.manager import DeliveryTimedOut, IntakeFactory, QueueManager
from mailrelay.queue.policy import QueuePolicy, backoff

__all__ = ["DeliveryTimedOut", "IntakeFactory", "QueueManager", "QueuePolicy", "backoff"]

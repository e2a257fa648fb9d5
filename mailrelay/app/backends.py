"""The delivery backends of a L{Config}: the built-in ones, configured, and the site's."""

from __future__ import annotations

from typing import Any

from mailrelay.config import Config
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IDeliveryBackend


def makeBackends(config: Config, reactor: Any, build: Any) -> dict[str, Any]:
    """The built-in delivery backends, configured, and the site backends (plugins).  Each
    route's options are applied by its backend at delivery time, over these defaults."""
    import dataclasses

    from mailrelay.delivery.discard import DiscardBackend
    from mailrelay.delivery.lmtp import LMTPBackend
    from mailrelay.delivery.maildir import MaildirBackend
    from mailrelay.delivery.smtp import SMTPBackend
    from mailrelay.route.mx import MXResolver, makeResolver
    from mailrelay.smtp.client import ClientSettings, ClientTimeouts

    source = config.source or "(embedded default)"
    delivery = config.delivery
    try:
        base = ClientSettings(
            heloName=delivery.heloName or config.hostname,
            tls=delivery.tls,
            caFile=delivery.caFile,
            timeouts=ClientTimeouts(**delivery.timeouts),
        )
        lmtpBase = dataclasses.replace(base, lmtp=True, tls="none", caFile=None)
        resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)
        backends: dict[str, Any] = {
            "smtp": SMTPBackend(
                reactor,
                MXResolver(resolver, reactor),
                base,
                destinationConcurrency=delivery.destinationConcurrency,
                connectionCacheTime=delivery.connectionCacheTime,
            ),
            "lmtp": LMTPBackend(
                reactor,
                lmtpBase,
                concurrency=delivery.destinationConcurrency,
            ),
            "maildir": MaildirBackend(reactor, hostname=config.hostname),
            "discard": DiscardBackend(),
        }
    except ValueError as e:
        raise ConfigError(str(e), file=source, key="delivery") from e
    for spec in config.backends:
        backends[spec.name] = build(spec, IDeliveryBackend)
    return backends

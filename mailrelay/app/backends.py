"""The delivery backends of a L{Config}: the built-in ones and the site's, all built as plugins;
and its router: the C{[[routers]]} plugins before the routing table.

The built-in backends are the dropin's C{smtp}, C{lmtp}, C{maildir} and C{discard} plugins,
given options made of C{[delivery]} and C{[dns]}; the site backends are C{[[backends]]}
tables.  Both go through the same plugin builder, as the routers do.
"""

from __future__ import annotations

from typing import Any

from mailrelay.config import BackendSpec, Config
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IDeliveryBackend, IRouter


def builtinBackendSpecs(config: Config) -> list[BackendSpec]:
    """The plugin entries of the built-in backends, their options made of C{config}."""
    from mailrelay.delivery.common import BUILTIN_BACKENDS

    options: dict[str, dict[str, Any]] = {
        "smtp": {
            "settings": config.delivery,
            "nameservers": config.nameservers,
            "destination_concurrency": config.destinationConcurrency,
            "connection_cache_time": config.connectionCacheTime,
            "mx_address_limit": config.mxAddressLimit,
            "mx_session_limit": config.mxSessionLimit,
            # Where the relay itself receives mail (an MX host there is the relay).
            "listeners": tuple(listener.settings.name for listener in config.listeners),
            "proxy_interfaces": config.proxyInterfaces,
            # Postfix's $minimal_backoff_time (see mailrelay.delivery.smtp).
            "plaintext_fallback_age": config.queue.minBackoff,
            "mta_sts": config.mtaSts,
            "mta_sts_cache": str(config.spoolDirectory / "mta-sts.json"),
            "dane": config.dane,
            "fallback_relay": config.fallbackRelay,
        },
        "lmtp": {
            "settings": config.delivery,
            "concurrency": config.destinationConcurrency,
            "plaintext_fallback_age": config.queue.minBackoff,
        },
        "maildir": {
            "create_mailboxes": config.createMailboxes,
            "recipient_delimiter": config.recipientDelimiter,
        },
    }
    return [
        BackendSpec(name=name, plugin=name, options=options.get(name, {}), key="delivery")
        for name in BUILTIN_BACKENDS
    ]


def makeBackends(config: Config, reactor: Any, build: Any) -> dict[str, Any]:
    """The built-in delivery backends, configured, and the site backends, by name.  Each
    route's options are applied by its backend at delivery time, over these defaults.

    @param build: C{build(spec, interface)} (L{mailrelay.app.plugins.pluginBuilder}).
    @raise ConfigError: a backend is refused, or a C{[[backends]]} table names a built-in
        backend's plugin (those are set up by C{[delivery]}, and routes name them directly).
    """
    builtins = builtinBackendSpecs(config)
    for spec in config.backends:
        if spec.plugin in {b.plugin for b in builtins}:
            raise ConfigError(
                f"{spec.plugin!r} is a built-in backend: routes name it as their backend and "
                "[delivery] sets it up; it cannot be the plugin of a [[backends]] table",
                file=config.source or "(embedded default)",
                key=f"{spec.key}.plugin",
            )
    return {spec.name: build(spec, IDeliveryBackend) for spec in [*builtins, *config.backends]}


def makeRouter(config: Config, reactor: Any, build: Any, table: Any) -> Any:
    """The queue's router: the C{[[routers]]} plugins in order, then C{table} (the routing
    table of C{config}); C{table} itself when there are none.

    @param build: C{build(spec, interface)} (L{mailrelay.app.plugins.pluginBuilder}).
    @raise ConfigError: a router plugin is refused.
    """
    from mailrelay.route.chain import ConfiguredRouter, chainRouters

    routers = [
        ConfiguredRouter(spec.plugin, build(spec, IRouter), spec.timeout) for spec in config.routers
    ]
    return chainRouters(routers, table, reactor)

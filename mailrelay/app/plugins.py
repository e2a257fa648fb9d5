"""Plugin discovery and construction, and what C{twistd mailrelay --list-plugins} prints.

Plugins are objects providing L{IMailRelayPlugin}, found with C{twisted.plugin.getPlugins} in
every C{twisted/plugins/} directory on C{sys.path}.  The configuration names them; the
configuration layer finds each by name, builds it with its options and checks the result with
C{verifyObject} (L{mailrelay.config.plugins}, re-exported here, the path plugin authors
know: C{mailrelay.plugins} is this module).

This module must stay cheap to import: site dropins import L{MailRelayPlugin} from it (as
C{mailrelay.plugins}) while Twisted scans plugins, so it never imports the reactor or reads
configuration at import time.  L{MailRelayPlugin} itself is a value of L{mailrelay.interfaces}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailrelay.config.plugins import (
    availablePlugins,
    buildPlugin,
    hookNames,
    pluginBuilder,
)
from mailrelay.interfaces import HOOKS, IMailRelayPlugin, MailRelayPlugin, providedBy

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.config import Config

__all__ = [
    "MailRelayPlugin",
    "availablePlugins",
    "buildPlugin",
    "describePlugins",
    "pluginBuilder",
]


def _interfaces(plugin: IMailRelayPlugin) -> str:
    return ", ".join(i.__name__ for i in providedBy(plugin))


def describePlugins(available: dict[str, IMailRelayPlugin], config: Config | None) -> str:
    """What C{--list-plugins} prints: every installed plugin (its name, what it provides and
    the hooks of C{[[plugins]]} it may serve, its description), then, for C{config}, the
    chain of each hook in the order the plugins run, and the other plugin tables."""
    lines = ["Installed plugins:"]
    width = max((len(name) for name in available), default=0)
    for name in sorted(available):
        plugin = available[name]
        hooks = hookNames(providedBy(plugin))
        served = f" [hooks: {', '.join(hooks)}]" if hooks else ""
        lines.append(f"  {name:<{width}}  {_interfaces(plugin)}{served}")
        lines.append(f"  {'':<{width}}  {plugin.description}")
    if config is None:
        return "\n".join(lines) + "\n"
    source = config.source or "the embedded default"
    lines += ["", f"Effective chains of {source} (in the order they run):"]
    chains = _chains(available, config)
    width = max(len(label) for label, _ in chains)
    for label, members in chains:
        lines.append(f"  {label:<{width}}  {' -> '.join(members) if members else '(none)'}")
    return "\n".join(lines) + "\n"


def _entry(spec: Any) -> str:
    return f"{spec.plugin} ({spec.key}, timeout {spec.timeout:g}s)"


def _chains(available: dict[str, IMailRelayPlugin], config: Config) -> list[tuple[str, list[str]]]:
    """Each hook's members, as labels; an entry whose plugin is not installed is shown as
    such (the relay would refuse to start)."""
    served: dict[str, list[str]] = {hook.name: [] for hook in HOOKS}
    for spec in config.plugins:
        plugin = available.get(spec.plugin)
        if plugin is None:
            label = f"{spec.plugin} ({spec.key}: NOT INSTALLED)"
            hooks = spec.hooks or tuple(served)
        else:
            label = _entry(spec)
            provided = hookNames(providedBy(plugin))
            hooks = tuple(h for h in (spec.hooks or provided) if h in provided)
        for name in hooks:
            served[name].append(label)
    mail = ["[built in: sender binding, message rates, free space]"]
    rcpt = ["[relay control]"] + [_entry(s) for s in config.recipientValidators]
    chains: list[tuple[str, list[str]]] = []
    for hook in HOOKS:
        builtin = mail if hook.name == "mail" else rcpt if hook.name == "rcpt" else []
        chains.append((f"{hook.name} ({hook.stage})", builtin + served[hook.name]))
        if hook.name == "data":
            stamps = [_entry(s) for s in config.headerStampers]
            chains.append(("stamp (header stampers, at the end of the header section)", stamps))
    routes = [_entry(s) for s in config.routers] + ["[routes, sender routes, smarthost, MX]"]
    chains.append(("route (routers, then the routing table)", routes))
    backends = ["smtp", "lmtp", "maildir", "discard"] + [
        f"{s.name} = {_entry(s)}" for s in config.backends
    ]
    chains.append(("backends (by name, as routes choose)", [", ".join(backends)]))
    if config.auth is not None and config.auth.checker is not None:
        chains.append(("auth checker", [_entry(config.auth.checker)]))
    if config.rateLimiter is not None:
        chains.append(("rate limiter", [_entry(config.rateLimiter)]))
    return chains

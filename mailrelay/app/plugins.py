"""Plugin discovery and construction.

Plugins are objects providing L{IMailRelayPlugin}, found with C{twisted.plugin.getPlugins} in
every C{twisted/plugins/} directory on C{sys.path}.  The configuration names them; this module
finds each by name, builds it with its options and checks the result with C{verifyObject}.

This module must stay cheap to import: site dropins import L{MailRelayPlugin} from it (as
C{mailrelay.plugins}) while Twisted scans plugins, so it never imports the reactor or reads
configuration at import time.  L{MailRelayPlugin} itself is a value of L{mailrelay.interfaces}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.plugin import getPlugins
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailrelay.errors import ConfigError
from mailrelay.interfaces import IMailRelayPlugin, MailRelayPlugin, PluginContext

if TYPE_CHECKING:
    from mailrelay.config import Config

__all__ = ["MailRelayPlugin", "availablePlugins", "buildPlugin", "pluginBuilder"]


def availablePlugins() -> dict[str, IMailRelayPlugin]:
    """Every installed plugin by name.

    @raise ConfigError: two plugins share a name (the message names both).
    """
    import twisted.plugins

    found: dict[str, IMailRelayPlugin] = {}
    for plugin in getPlugins(IMailRelayPlugin, twisted.plugins):
        name = plugin.name
        if name in found and found[name] is not plugin:
            raise ConfigError(
                f"two installed plugins are named {name!r}: {found[name]!r} and {plugin!r}"
            )
        found[name] = plugin
    return found


def buildPlugin(
    available: dict[str, IMailRelayPlugin],
    name: Any,
    interface: type[Interface],
    options: dict[str, Any],
    context: PluginContext,
) -> Any:
    """Build the plugin called C{name}, which must provide C{interface}.

    @raise ConfigError: unknown name, a plugin of another kind, options refused by the plugin,
        or a built object that does not provide the interface.
    """
    if not isinstance(name, str):
        raise ConfigError(f"must be a plugin name (a string), not {name!r}", key="plugin")
    plugin = available.get(name)
    if plugin is None:
        candidates = sorted(n for n, p in available.items() if p.provides is interface)
        raise ConfigError(
            f"unknown plugin {name!r}; installed {interface.__name__} plugins: "
            + (", ".join(candidates) or "none"),
            key="plugin",
        )
    if plugin.provides is not interface and not interface.isEqualOrExtendedBy(plugin.provides):
        raise ConfigError(
            f"plugin {name!r} provides {plugin.provides.__name__}, not {interface.__name__}",
            key="plugin",
        )
    try:
        obj = plugin.build(dict(options), context)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"plugin {name!r}: {e}") from e
    try:
        verifyObject(interface, obj)
    except Invalid as e:
        raise ConfigError(
            f"plugin {name!r} built {obj!r}, which does not provide {interface.__name__}: {e}",
            key="plugin",
        ) from e
    return obj


def pluginBuilder(config: Config, reactor: Any, available: dict[str, IMailRelayPlugin]) -> Any:
    """C{build(spec, interface)}: builds the plugin a configuration entry names; a
    L{ConfigError} names the file and the entry's key.

    @param available: the installed plugins by name (L{availablePlugins}).
    """
    context = PluginContext(hostname=config.hostname, configDir=config.configDir, reactor=reactor)

    def build(spec: Any, interface: Any) -> Any:
        try:
            return buildPlugin(available, spec.plugin, interface, spec.options, context)
        except ConfigError as e:
            raise e.within(file=config.source or "(embedded default)", key=spec.key) from e

    return build

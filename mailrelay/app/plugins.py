"""Plugin discovery and construction.

Plugins are objects providing L{IMailRelayPlugin}, found with C{twisted.plugin.getPlugins} in
every C{twisted/plugins/} directory on C{sys.path}.  The configuration names them; this module
finds each by name, builds it with its options and checks the result with C{verifyObject}.

This module must stay cheap to import: the dropin imports it while Twisted scans plugins, so it
never imports the reactor or reads configuration at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.plugin import IPlugin, getPlugins
from zope.interface import Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailrelay.errors import ConfigError
from mailrelay.interfaces import IMailRelayPlugin, PluginContext

if TYPE_CHECKING:
    from mailrelay.config import Config


@implementer(IPlugin, IMailRelayPlugin)
@dataclass(frozen=True)
class MailRelayPlugin:
    """A ready-made L{IMailRelayPlugin}: a name, the interface provided, and a factory.

    C{factory} is either a callable C{factory(options, context)} or a string
    C{"package.module:function"} imported only when the plugin is built, so that scanning
    the dropin stays cheap.  Site dropins can use this class too::

        from mailrelay.interfaces import IRecipientValidator
        from mailrelay.plugins import MailRelayPlugin
        acmeRecipients = MailRelayPlugin(
            name="acme-recipients",
            provides=IRecipientValidator,
            description="Recipients from ACME's directory",
            factory="acme_mailrelay.recipients:build",
        )
    """

    name: str
    provides: Any  # an InterfaceClass such as IRecipientValidator
    description: str
    factory: str | Callable[[dict[str, Any], PluginContext], Any] = field(repr=False)

    def build(self, options: dict[str, Any], context: PluginContext) -> Any:
        factory = self.factory
        if isinstance(factory, str):
            moduleName, sep, attr = factory.partition(":")
            if not sep or not moduleName or not attr:
                raise ConfigError(f"plugin {self.name!r} has a bad factory {factory!r} (want 'module:function')")
            try:
                factory = getattr(importlib.import_module(moduleName), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"plugin {self.name!r}: cannot load its factory {factory!r}: {e}") from e
        return factory(options, context)


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

"""The configuration's plugins: found, built, checked, and put where they serve.

Plugins are objects providing L{IMailRelayPlugin}, found with C{twisted.plugin.getPlugins} in
every C{twisted/plugins/} directory on C{sys.path} (L{availablePlugins}).  The configuration
names them; L{buildPlugin} builds one with its options and checks the result with
C{verifyObject}; L{pluginBuilder} does it for a configuration's entries, naming the file and
the entry in every error.

The C{[[plugins]]} entries serve the hooks of L{mailrelay.interfaces.HOOKS}: L{buildHooks}
builds those of one process (the relay's, the delivery process's, or both) into
L{HookPlugins}, which makes the chains (L{mailrelay.policy.runner.PolicyChain}) the stages
run, the observers, the ESMTP extensions, and lists the plugin objects that are services.

Part of the config layer (it may import the values, L{mailrelay.smtp} and the stages): the
relay (L{mailrelay.app}) and the test kit (L{mailrelay.testing}) both build plugins with it.
This module never imports the reactor at import time.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.plugin import getPlugins
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailrelay.errors import ConfigError, describeValue
from mailrelay.interfaces import (
    HOOKS,
    HOOKS_BY_NAME,
    ConfiguredPlugin,
    IMailRelayPlugin,
    IRewritingFilter,
    ISigningFilter,
    PluginContext,
    providedBy,
)

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.config.types import Config, PluginSpec

__all__ = [
    "HookPlugins",
    "PluginEntry",
    "availablePlugins",
    "buildHooks",
    "buildPlugin",
    "hookNames",
    "makeContext",
    "pluginBuilder",
]

#: Where the hooks of each process kind run: the relay's SMTP side with a delivery process
#: of its own, that delivery process, or one process doing both (C{[queue] process =
#: "inline"}).
_PROCESS_HOOKS = {
    "relay": ("relay", "both"),
    "delivery": ("delivery", "both"),
    "inline": ("relay", "delivery", "both"),
}


#: The dropins (C{"PATH: Error: message"}) this process has said failed to import.
_reportedDropins: set[str] = set()


class _DropinImportErrors:
    """Stands in for C{twisted.plugin}'s C{log} during a scan (L{availablePlugins}): a
    dropin that fails to import is noted (its path and error) instead of being logged as
    an "Unhandled Error" with its traceback, by every process at every scan, even when
    none of its plugins is used; anything else goes to the real C{log}."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def err(self, _stuff: Any = None, _why: Any = None, **kw: Any) -> None:
        _, error, tb = sys.exc_info()
        module = tb.tb_frame.f_locals.get("pluginModule") if tb is not None else None
        path = getattr(getattr(module, "filePath", None), "path", None)
        if _stuff is None and _why is None and error is not None and isinstance(path, str):
            self.failed.append(f"{path}: {type(error).__name__}: {error}")
        else:
            self.real.err(_stuff, _why, **kw)


def _scan(interface: Any, package: Any) -> list[Any]:
    """C{getPlugins(interface, package)}, a dropin that fails to import said once per
    process in one line (its path, its error): its plugins are not installed, and a
    configuration naming one is refused (L{buildPlugin} says why)."""
    import twisted.plugin
    from twisted.logger import Logger

    errors = _DropinImportErrors(twisted.plugin.log)
    twisted.plugin.log = errors  # type: ignore[assignment]
    try:
        plugins = list(getPlugins(interface, package))
    finally:
        twisted.plugin.log = errors.real
    for failed in errors.failed:
        if failed not in _reportedDropins:
            _reportedDropins.add(failed)
            path, _, error = failed.partition(": ")
            Logger(namespace="mailrelay.plugins").error(
                "plugin dropin {path} failed to import, its plugins are not installed: "
                "{error}",
                path=path,
                error=error,
            )
    return plugins


def availablePlugins() -> dict[str, IMailRelayPlugin]:
    """Every installed plugin by name.  A dropin that fails to import is logged once per
    process, in one line (L{_scan}).

    @raise ConfigError: two plugins share a name (the message names both).
    """
    import twisted.plugins

    found: dict[str, IMailRelayPlugin] = {}
    for plugin in _scan(IMailRelayPlugin, twisted.plugins):
        name = plugin.name
        if name in found and found[name] is not plugin:
            raise ConfigError(
                f"two installed plugins are named {name!r}: {found[name]!r} and {plugin!r}"
            )
        found[name] = plugin
    return found


def brokenDropins() -> list[str]:
    """The dropins (modules of the C{twisted/plugins/} directories on C{sys.path}) that
    failed to import, each as C{"PATH: Error: message"}: Twisted's scan logs their
    tracebacks and leaves their plugins out, so that a configuration naming one would
    only hear of an unknown plugin.  (Each is imported again to say why: for error
    messages only.)"""
    import importlib

    from twisted.plugin import getCache
    from twisted.python.modules import getModule

    import twisted.plugins

    scanned = getCache(twisted.plugins)
    broken = []
    for module in getModule(twisted.plugins.__name__).iterModules():
        if module.name.rpartition(".")[2] in scanned or module.name in sys.modules:
            continue
        try:
            importlib.import_module(module.name)
        except Exception as e:
            broken.append(f"{module.filePath.path}: {type(e).__name__}: {e}")
    return broken


def hiddenDropins() -> list[str]:
    """The dropins that another of the same file name, in an earlier C{twisted/plugins/}
    directory on C{sys.path}, hides (Python imports one module of a name: two sites'
    C{site_plugin.py}), each as C{"PATH, hidden by PATH: rename one"}."""
    import os

    import twisted.plugins

    first: dict[str, str] = {}
    hidden = []
    seen = set()
    for directory in twisted.plugins.__path__:
        real = os.path.realpath(directory)
        if real in seen:
            continue  # (one directory on the path twice: the same files, hiding nothing)
        seen.add(real)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            stem, _, extension = name.rpartition(".")
            if extension != "py" or stem == "__init__":
                continue
            path = os.path.join(directory, name)
            if stem in first:
                hidden.append(f"{path}, hidden by {first[stem]}: rename one")
            else:
                first[stem] = path
    return hidden


def _provides(plugin: Any, interface: Any) -> bool:
    return any(interface.isEqualOrExtendedBy(p) for p in providedBy(plugin))


def _names(interfaces: Sequence[Any]) -> str:
    return " or ".join(i.__name__ for i in interfaces)


def buildPlugin(
    available: dict[str, IMailRelayPlugin],
    name: Any,
    interface: Any,
    options: dict[str, Any],
    context: PluginContext,
) -> Any:
    """Build the plugin called C{name}, which must provide C{interface}.

    @param interface: the interface the object must provide, or a tuple of them (one of
        which the plugin must declare); C{None}: whatever the plugin declares.  The object
        built must provide every interface the plugin declares.
    @raise ConfigError: unknown name, a plugin of another kind, options refused by the plugin,
        any other exception from its C{build} (one line: the plugin's name, the exception),
        or a built object that does not provide its interfaces.
    """
    wanted: tuple[Any, ...] = (
        () if interface is None else interface if isinstance(interface, tuple) else (interface,)
    )
    if not isinstance(name, str):
        raise ConfigError(f"must be a plugin name (a string), not {name!r}", key="plugin")
    plugin = available.get(name)
    if plugin is None:
        candidates = sorted(
            n for n, p in available.items() if not wanted or any(_provides(p, i) for i in wanted)
        )
        kind = f"{_names(wanted)} " if wanted else ""
        broken = "".join(
            f"; a dropin failed to import (its plugins are missing): {b}" for b in brokenDropins()
        ) + "".join(
            f"; a dropin is hidden by another of its name (its plugins are missing): {h}"
            for h in hiddenDropins()
        )
        raise ConfigError(
            f"unknown plugin {name!r}; installed {kind}plugins: "
            + (", ".join(candidates) or "none")
            + broken,
            key="plugin",
        )
    if wanted and not any(_provides(plugin, i) for i in wanted):
        raise ConfigError(
            f"plugin {name!r} provides {_names(providedBy(plugin))}, not {_names(wanted)}",
            key="plugin",
        )
    try:
        obj = plugin.build(dict(options), context)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as e:  # (an option refused without ConfigError)
        raise ConfigError(f"plugin {name!r}: {e}") from e
    except (Exception, SystemExit) as e:  # (sys.exit in a factory: no silent exit)
        raise ConfigError(f"plugin {name!r} failed to build: {type(e).__name__}: {e}") from e
    for provided in {*providedBy(plugin), *wanted}:
        try:
            verifyObject(provided, obj)
        except Invalid as e:
            raise ConfigError(
                f"plugin {name!r} built {obj!r}, which does not provide {provided.__name__}: "
                f"{e}",
                key="plugin",
            ) from e
    return obj


def makeContext(
    config: Config, reactor: Any, *, resolver: Any = None, kept: Any = None, quiet: bool = False
) -> PluginContext:
    """The L{PluginContext} of C{config}'s plugins.

    @param resolver: the resolver asking C{[dns] nameservers} (or the system's); made here
        when not given (and there is a reactor).
    @param kept: what L{PluginContext.keep} keeps, shared across reloads.
    @param quiet: in a child process of the relay (L{PluginContext.quiet}).
    """
    from mailrelay.config.values import resolveProcessCount

    if resolver is None and reactor is not None:
        from mailrelay.route import makeResolver

        resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)
    return PluginContext(
        hostname=config.hostname,
        configDir=config.configDir,
        reactor=reactor,
        resolver=resolver,
        source=config.source,
        kept=kept if kept is not None else {},
        quiet=quiet,
        processes=resolveProcessCount(config.processes),
        recipientDelimiter=config.recipientDelimiter,
    )


def pluginBuilder(
    config: Config,
    reactor: Any,
    available: dict[str, IMailRelayPlugin],
    context: PluginContext | None = None,
) -> Any:
    """C{build(spec, interface)}: builds the plugin a configuration entry names; a
    L{ConfigError} names the file and the entry's key.  C{build.context} is the
    L{PluginContext} given to every plugin.

    @param available: the installed plugins by name (L{availablePlugins}).
    @param context: the context (by default L{makeContext}).
    """
    context = context if context is not None else makeContext(config, reactor)

    def build(spec: Any, interface: Any) -> Any:
        # The context of this entry: its timeout and key (PluginContext.checkTimeout).
        entry = dataclasses.replace(
            context, timeout=getattr(spec, "timeout", None), entry=getattr(spec, "key", None)
        )
        try:
            return buildPlugin(available, spec.plugin, interface, spec.options, entry)
        except ConfigError as e:
            raise e.within(file=config.source or "(embedded default)", key=spec.key) from e

    build.context = context  # type: ignore[attr-defined]
    build.available = available  # type: ignore[attr-defined]
    return build


# ---------------------------------------------------------------------------------------------
# [[plugins]]: the hooks


def hookNames(interfaces: Sequence[Any]) -> tuple[str, ...]:
    """The hooks (of L{HOOKS}, in order) served by providers of C{interfaces}."""
    return tuple(
        hook.name
        for hook in HOOKS
        if any(hook.interface.isEqualOrExtendedBy(i) for i in interfaces)
    )


@dataclass(frozen=True)
class PluginEntry:
    """One C{[[plugins]]} entry, built: the object and the hooks it serves here.

    @ivar name: the plugin's name (for the log; the chains' L{ConfiguredPlugin} name).
    @ivar plugin: the object.
    @ivar timeout: seconds one call of it may take.
    @ivar hooks: the names of the hooks it serves, in L{HOOKS} order.
    @ivar key: where the entry is (C{"plugins[2]"}), for messages.
    """

    name: str
    plugin: Any
    timeout: float = 30.0
    hooks: tuple[str, ...] = ()
    key: str = ""

    @classmethod
    def serving(
        cls, name: str, plugin: Any, timeout: float = 30.0, hooks: Sequence[str] | None = None
    ) -> PluginEntry:
        """The entry of C{plugin} serving C{hooks} (by default: every hook whose interface
        the object provides).

        @raise ValueError: a hook not known, or whose interface the object does not provide;
            or, by default, an object serving none.
        """
        provided = tuple(h.name for h in HOOKS if h.interface.providedBy(plugin))
        if hooks is None:
            if not provided:
                raise ValueError(
                    f"plugin {name!r} serves none of the hooks of [[plugins]] ("
                    + ", ".join(h.name for h in HOOKS)
                    + ")"
                    + _otherTable(plugin)
                )
            return cls(name, plugin, timeout, provided)
        for hook in hooks:
            if hook not in HOOKS_BY_NAME:
                raise ValueError(f"unknown hook {describeValue(hook)}")
            if hook not in provided:
                interface = HOOKS_BY_NAME[hook].interface.__name__
                raise ValueError(
                    f"{describeValue(hook)}: the plugin does not provide {interface}"
                )
        return cls(name, plugin, timeout, tuple(h.name for h in HOOKS if h.name in hooks))


def _otherTable(plugin: Any) -> str:
    """For a plugin serving none of the hooks of C{[[plugins]]}: the table that names a
    plugin of its kind, as the end of the error, or C{""}."""
    from twisted.cred.checkers import ICredentialsChecker

    from mailrelay.interfaces import IDeliveryBackend, IHeaderStamper, IRateLimiter, IRouter

    for interface, table in (
        (IHeaderStamper, "[[header_stampers]]"),
        (IRouter, "[[routers]]"),
        (IDeliveryBackend, "[[backends]]"),
        (IRateLimiter, "[rate_limiter]"),
        (ICredentialsChecker, "[auth.checker]"),
    ):
        if interface.providedBy(plugin):
            return f": it provides {interface.__name__}, which a {table} table names"
    return ""


@dataclass(frozen=True)
class HookPlugins:
    """The plugins serving the hooks of C{[[plugins]]} in one process, in configuration order.

    @ivar entries: the L{PluginEntry}s.
    @ivar validators: the recipient validators of the older C{[[recipient_validators]]}
        tables, which run before the entries serving C{rcpt}.
    """

    entries: tuple[PluginEntry, ...] = ()
    validators: tuple[ConfiguredPlugin, ...] = field(default=())

    def serving(self, hook: str) -> tuple[ConfiguredPlugin, ...]:
        """The plugins serving C{hook}, in order, as the chains take them."""
        found = tuple(
            ConfiguredPlugin(e.name, e.plugin, e.timeout) for e in self.entries if hook in e.hooks
        )
        return self.validators + found if hook == "rcpt" else found

    @property
    def services(self) -> tuple[tuple[str, Any], ...]:
        """The plugin objects that are services (C{IService}), each once, in order, with
        their plugins' names."""
        from twisted.application.service import IService

        found: list[tuple[str, Any]] = []
        for entry in self.entries:
            plugin = entry.plugin
            if IService.providedBy(plugin) and all(plugin is not s for _, s in found):
                found.append((entry.name, plugin))
        return tuple(found)

    def sessionHooks(self, clock: Any) -> Any:
        """The L{mailrelay.policy.hooks.SessionHooks} of the listeners.

        @raise ValueError: an ESMTP extension clashes with the relay or another one.
        """
        from mailrelay.policy.hooks import makeSessionHooks
        from mailrelay.receive.extensions import ExtensionAdapter, checkExtensions

        extensions = [
            ExtensionAdapter(c.name, c.plugin, c.timeout or 30.0, clock)
            for c in self.serving("esmtp")
        ]
        checkExtensions(extensions)
        return makeSessionHooks(
            clock,
            connect=self.serving("connect"),
            helo=self.serving("helo"),
            senders=self.serving("mail"),
            data=self.serving("data"),
            extensions=extensions,
        )

    def filterChain(self, clock: Any) -> Any:
        """The message filters' chain for the intake, or C{None} without filters."""
        from mailrelay.cleanup.filters import filterVerdict
        from mailrelay.cleanup.intake import FILTER_FAILED
        from mailrelay.policy.runner import PolicyChain

        filters = self.serving("message")
        if not filters:
            return None
        return PolicyChain(
            "message", "filterMessage", filters, clock, FILTER_FAILED, filterVerdict
        )

    def observers(self, clock: Any) -> Any:
        """The queue's L{mailrelay.queue.observers.Observers}."""
        from mailrelay.queue.observers import Observers

        return Observers(clock, self.serving("queue"), self.serving("delivery"))


def buildHooks(
    config: Config, build: Callable[[Any, Any], Any], process: str = "inline"
) -> HookPlugins:
    """Build the C{[[plugins]]} entries of C{config} that serve a hook of C{process}
    (C{"relay"}, C{"delivery"} or C{"inline"}: both), and the C{[[recipient_validators]]}
    when the process has the SMTP side.

    @param build: C{build(spec, interface)} (L{pluginBuilder}).
    @raise ConfigError: a plugin is unknown, refuses its options, fails to build, serves none
        of the hooks, or does not provide a hook its entry names.
    """
    from mailrelay.interfaces import IRecipientValidator

    where = _PROCESS_HOOKS[process]
    available = getattr(build, "available", None)
    entries: list[PluginEntry] = []
    for spec in config.plugins:
        if not _servesHere(spec, available, where):
            continue
        plugin = build(spec, None)
        try:
            entry = PluginEntry.serving(spec.plugin, plugin, spec.timeout, spec.hooks or None)
        except ValueError as e:
            raise ConfigError(
                str(e),
                file=config.source or "(embedded default)",
                key=f"{spec.key}.{'hooks' if spec.hooks else 'plugin'}",
            ) from None
        hooks = tuple(h for h in entry.hooks if HOOKS_BY_NAME[h].process in where)
        entries.append(PluginEntry(entry.name, plugin, entry.timeout, hooks, spec.key))
    _checkFilterOrder(entries, config.source or "(embedded default)")
    validators: tuple[ConfiguredPlugin, ...] = ()
    if "relay" in where:
        validators = tuple(
            ConfiguredPlugin(spec.plugin, build(spec, IRecipientValidator), spec.timeout)
            for spec in config.recipientValidators
        )
    return HookPlugins(tuple(entries), validators)


def _checkFilterOrder(entries: Sequence[PluginEntry], source: str) -> None:
    """Refuse a message filter that rewrites addresses or header fields (L{IRewritingFilter})
    after one that signs the message (L{ISigningFilter}), as each declares, the built-ins
    (C{sender-canonical}, C{dkim-sign}) and a site's alike: the signature would cover the
    message before its rewriting, and break (RFC 6376 5.4).

    @raise ConfigError: naming both entries.
    """
    signer: PluginEntry | None = None
    for entry in entries:
        if "message" not in entry.hooks:
            continue
        if signer is not None and IRewritingFilter.providedBy(entry.plugin):
            raise ConfigError(
                f"{entry.name} must come before {signer.name} ({signer.key}): {entry.name} "
                f"rewrites addresses or header fields and {signer.name} signs the message: "
                "the signature must cover them as they leave (RFC 6376 5.4)",
                file=source,
                key=entry.key,
            )
        if signer is None and ISigningFilter.providedBy(entry.plugin):
            signer = entry


def _servesHere(spec: PluginSpec, available: Any, where: Sequence[str]) -> bool:
    """Whether the entry C{spec} may serve a hook of this process: by the hooks it names,
    else by the interfaces its plugin declares (an unknown plugin is built, to be refused
    with the list of those installed)."""
    if spec.hooks:
        names: Sequence[str] = spec.hooks
    else:
        plugin = available.get(spec.plugin) if available is not None else None
        if plugin is None:
            return True
        names = hookNames(providedBy(plugin))
        if not names:
            return True  # built, to be refused for serving none
    return any(HOOKS_BY_NAME[name].process in where for name in names)


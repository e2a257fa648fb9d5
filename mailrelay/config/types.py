"""The configuration's own frozen types, as L{mailrelay.config.loadConfig} returns them: the
whole L{Config}, a listener with its certificates, the plugin entries.  The settings of the
stages are the stages' own types (L{mailrelay.queue.policy.QueuePolicy},
L{mailrelay.smtp.clientsettings.ClientSettings}, L{mailrelay.interfaces.RouteOptions},
L{mailrelay.route.table.RouteRule}, L{mailrelay.receive.auth.AuthSettings},
L{mailrelay.receive.listener.ListenerSettings}), which the keys fill directly.

A field's default is the default of the key that fills it (L{mailrelay.config.keys} declares
no other, unless the field has none), so that a type built by hand, as tests do, is what the
loader gives for the keys left out.

Part of the config layer: it may import the values, L{mailrelay.smtp} and the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mailrelay.config.values import IPNetwork
from mailrelay.headers import HEADER_SECTION_LIMIT
from mailrelay.interfaces import RouteOptions
from mailrelay.queue.policy import QueuePolicy
from mailrelay.receive.auth import AuthSettings
from mailrelay.receive.listener import ListenerSettings
from mailrelay.receive.tls import ServerTLS
from mailrelay.route.nexthop import SMTPNexthop
from mailrelay.route.table import RouteRule, SenderRoute
from mailrelay.smtp.clientsettings import ClientSettings


@dataclass(frozen=True)
class SNICertificate:
    """A certificate a listener presents to clients asking for C{server_name} (TLS SNI).

    @ivar serverName: a lower-case host name, or C{"*.example.org"} for the names one label
        below C{example.org}.
    @ivar certificate: the absolute path of its PEM certificate chain.
    @ivar key: the absolute path of its PEM private key (the certificate's file when it holds
        both).
    """

    serverName: str
    certificate: str
    key: str


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP listener (C{[[listeners]]}): the settings it runs with, and the certificates
    they were made of, loaded once (for the log).

    @ivar settings: the listener's L{ListenerSettings}: its keys, with the relay's host name,
        the session limits of C{[limits]}, the relay networks as its C{limitExceptions}
        unless it gives its own, the C{[rate_limiter]}'s time-out, and its C{tlsOptions}
        made of its certificates (by server name, with C{tls_certificates}).
    @ivar certificate: its C{tls_certificate} and key, loaded, or C{None} without TLS.
    @ivar sniCertificates: the certificates of C{tls_certificates}, loaded, by server name
        (in the file's order).
    @ivar endpointCertificate: an C{ssl:} endpoint's own certificate (C{certKey=}, or
        C{privateKey=}), loaded, or C{None}.
    """

    settings: ListenerSettings
    certificate: ServerTLS | None = field(default=None, compare=False)
    sniCertificates: tuple[tuple[str, ServerTLS], ...] = field(default=(), compare=False)
    endpointCertificate: ServerTLS | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PluginSpec:
    """One entry of a plugin list (C{[[plugins]]}, C{[[recipient_validators]]},
    C{[[header_stampers]]}, C{[[routers]]}).

    @ivar plugin: the plugin's name.
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds the plugin may take to answer (key C{timeout}, consumed by the
        loader, never passed to the plugin).
    @ivar key: where the entry came from, e.g. C{"recipient_validators[1]"}, for messages:
        C{error.within(file=config.source, key=spec.key)}.
    @ivar hooks: for a C{[[plugins]]} entry, the hooks it serves (names of
        L{mailrelay.interfaces.HOOKS}); C{()}: every hook its plugin provides.
    """

    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = 30.0
    key: str = ""
    hooks: tuple[str, ...] = ()



@dataclass(frozen=True)
class BackendSpec:
    """One C{[[backends]]} table: a site delivery backend (a plugin providing
    C{IDeliveryBackend}).

    @ivar name: the name routes use in C{backend}.
    @ivar plugin: the plugin's name (not checked here: the service builds it).
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds one delivery may take (key C{timeout}, consumed by the loader).
    @ivar key: where the entry came from, e.g. C{"backends[0]"}.
    """

    name: str
    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = 600.0
    key: str = ""


@dataclass(frozen=True)
class Config:
    """The relay's whole configuration, checked.

    @ivar source: the path of the configuration file as given, or C{None} for the defaults.
    @ivar configDir: the absolute directory of the file (the current directory without a file),
        against which the file's relative paths are resolved.
    @ivar hostname: this relay's host name (lower case, no trailing dot).
    @ivar spoolDirectory: the absolute path of the spool directory (it may not exist yet, but
        can be created).
    @ivar minFreeSpace: bytes that must stay free on the spool's file system.
    @ivar spoolSync: how the spool makes a batch durable: C{"syncfs"} or C{"fsync"}.
    @ivar mailqUsers: the users (ids) who may list the queue over the control socket besides
        root and the relay's user (C{[spool] mailq_users}); C{None}: anyone.
    @ivar relayNetworks: clients in these networks may relay to any domain.
    @ivar acceptDomains: domains (normalised) accepted from anyone.
    @ivar smarthost: where outgoing mail goes, or C{None} for direct MX delivery.
    @ivar maxMessageSize: the largest message accepted, in bytes.
    @ivar maxRecipients: the most recipients accepted for one message.
    @ivar recipientOvershootLimit: recipients refused past C{maxRecipients} in one message
        before each further one counts as an error (Postfix's smtpd_recipient_overshoot_limit).
    @ivar idleTimeout: seconds a client may stay silent between commands.
    @ivar dataTimeout: seconds a client may stay silent while sending message data.
    @ivar maxErrors: errors in one session before it is closed with 421.
    @ivar softErrorLimit: errors in one session after which each reply waits
        C{errorSleepTime} seconds (Postfix's smtpd_soft_error_limit, smtpd_error_sleep_time).
    @ivar errorSleepTime: that wait (0: none).
    @ivar junkCommandLimit: HELO, EHLO, RSET, NOOP, VRFY and HELP commands in one session
        after which each counts as an error (Postfix's smtpd_junk_command_limit).
    @ivar maxHops: the most C{Received:} fields a message may carry (mail loops).
    @ivar maxHeaderSize: the longest header section of a message, in bytes (longer: refused).
    @ivar dropHeaders: the header fields removed from every message (lower case).
    @ivar reverseDNS: look up the client's name (forward-confirmed) for C{Received:}.
    @ivar listeners: where to accept SMTP connections, and how.
    @ivar recipientValidators: the recipient validator plugins, in order (before the
        C{[[plugins]]} serving C{rcpt}).
    @ivar plugins: the C{[[plugins]]} entries: plugins serving the hooks of
        L{mailrelay.interfaces.HOOKS} (connect to delivery), in order.
    @ivar headerStampers: the header stamper plugins, in order.
    @ivar queue: how the queue manager retries, expires and notifies (C{[queue]}); its
        C{stopTimeout} is C{drainTime}.
    @ivar hold: accept and spool mail but deliver none (like Postfix's hold queue) until the
        relay is restarted or reloaded without it; for staged roll-outs and maintenance.
    @ivar queueProcess: C{"separate"}: the queue manager and delivery run in a process of
        their own (two cores: acceptance and delivery in parallel, like Postfix's smtpd and
        qmgr); C{"inline"}: in the relay's process.
    @ivar delivery: how the SMTP and LMTP clients talk to the next hops (C{[delivery]}): the
        name they give (C{helo_name}, else C{hostname}), the TLS policy and CA file for MX
        hosts and the default of C{smtp} routes, the time-outs.
    @ivar destinationConcurrency: the most connections to one destination at once.
    @ivar connectionCacheTime: seconds an idle connection is kept for reuse (C{0.0}: never).
    @ivar mxAddressLimit: the most MX host addresses one SMTP delivery tries (C{0}: no
        limit; Postfix's C{smtp_mx_address_limit}).
    @ivar mxSessionLimit: the most SMTP sessions of one delivery (C{0}: no limit; Postfix's
        C{smtp_mx_session_limit}).
    @ivar proxyInterfaces: IP addresses that receive mail for the relay on port 25 through a
        proxy or NAT (Postfix's C{proxy_interfaces}): an MX host there is the relay itself,
        as one where a listener listens.
    @ivar createMailboxes: maildir routes deliver to any user, creating its directory; else
        only to users whose directory exists (L{mailrelay.delivery.maildir}).
    @ivar mtaSts: deliveries by MX lookup follow the recipient domain's MTA-STS policy
        (L{mailrelay.route.mtasts}), kept in the spool's C{mta-sts.json}.
    @ivar dane: deliveries by MX lookup use the DANE TLSA records (RFC 7672) of MX hosts
        whose records the resolver validated (its AD bit: L{mailrelay.route.mx.makeResolver}).
    @ivar recipientDelimiter: the characters separating a maildir route's user from an
        address extension (C{"+"}: C{bob+lists@} goes to C{bob}'s mailbox), or C{""}.
    @ivar fallbackRelay: the SMTP next hops mail to the recipients' own domain's MX hosts
        is tried at, in order, when none of them took it for a temporary reason
        (C{[delivery] fallback_relay}, Postfix's C{smtp_fallback_relay}); C{()}: none.  A
        smarthost, sender route or route uses its own C{fallback_relay} only
        (L{RouteOptions.fallbackRelay <mailrelay.interfaces.RouteOptions>}).
    @ivar smarthostOptions: how to talk to the smarthost (C{[smarthost]}): every option
        set (C{tls} C{"may"}, the platform's trust store, no AUTH unless given).
    @ivar nameservers: C{(address, port)} of the DNS resolvers to use instead of the
        system's (C{/etc/resolv.conf}); C{()} for the system's.
    @ivar routes: the per-domain routes (C{[[routes]]}), in the file's order, as the routing
        table's rules: each with its next hop normalised (see
        L{mailrelay.config.checks.checkRoute}) and, for C{smtp} and C{lmtp} routes, its
        options (the C{tls} and C{ca_file} an C{smtp} route does not give are
        C{[delivery]}'s).
    @ivar senderRoutes: the sender routes (C{[[sender_routes]]}), in the file's order: where
        some senders' mail goes instead of the smarthost, with its own TLS and AUTH settings
        (C{[smarthost]}'s keys and defaults), each next hop normalised
        (L{mailrelay.route.table.SenderRoute}).
    @ivar backends: the site delivery backends.
    @ivar routers: the router plugins (providing L{mailrelay.interfaces.IRouter}) asked, in
        order, before C{routes}.
    @ivar auth: SMTP AUTH settings (C{[auth]}: the password file read, or the site
        checker's L{PluginSpec}), or C{None} without an C{[auth]} table.
    @ivar rateLimiter: the plugin (providing L{mailrelay.interfaces.IRateLimiter}) keeping the
        listeners' limit counters, shared by several relays, or C{None} for the in-memory
        default; its C{timeout} is how long one answer may take.
    @ivar drainTime: seconds a stopping relay lets sessions in DATA finish their message,
        and then deliveries in flight finish and be recorded.
    @ivar logLevel: the lowest level logged (C{"debug"}, C{"info"}, C{"warn"}, C{"error"},
        C{"critical"}).
    @ivar metricsListen: the endpoint serving Prometheus metrics and the health check, or
        C{None} for none.
    @ivar processes: how many processes accept SMTP connections on the listeners (the
        relay's own and C{processes - 1} acceptor processes sharing its listening sockets),
        or C{"auto"}: one per core (L{mailrelay.config.values.resolveProcessCount}).
    @ivar forkChildren: whether the child processes (delivery, acceptors) are forked from
        a copy of the relay made at start-up (L{mailrelay.app.forkserver}), sharing its
        memory, rather than started as new processes.
    """

    source: str | None
    configDir: Path
    hostname: str
    spoolDirectory: Path
    minFreeSpace: int
    relayNetworks: tuple[IPNetwork, ...]
    acceptDomains: tuple[str, ...]
    smarthost: SMTPNexthop | None
    maxMessageSize: int
    maxRecipients: int
    recipientOvershootLimit: int
    idleTimeout: float
    dataTimeout: float
    maxErrors: int
    softErrorLimit: int
    errorSleepTime: float
    junkCommandLimit: int
    maxHops: int
    reverseDNS: bool
    listeners: tuple[ListenerConfig, ...]
    recipientValidators: tuple[PluginSpec, ...]
    headerStampers: tuple[PluginSpec, ...]
    delivery: ClientSettings
    smarthostOptions: RouteOptions
    queue: QueuePolicy = QueuePolicy()
    hold: bool = False
    queueProcess: str = "separate"
    destinationConcurrency: int = 20
    connectionCacheTime: float = 2.0
    mxAddressLimit: int = 5
    mxSessionLimit: int = 2
    proxyInterfaces: tuple[str, ...] = ()
    createMailboxes: bool = False
    recipientDelimiter: str = ""
    mtaSts: bool = False
    dane: bool = False
    fallbackRelay: tuple[str, ...] = ()
    nameservers: tuple[tuple[str, int], ...] = ()
    routes: tuple[RouteRule, ...] = ()
    senderRoutes: tuple[SenderRoute, ...] = ()
    backends: tuple[BackendSpec, ...] = ()
    routers: tuple[PluginSpec, ...] = ()
    plugins: tuple[PluginSpec, ...] = ()
    spoolSync: str = "syncfs"
    mailqUsers: tuple[int, ...] | None = None
    auth: AuthSettings | None = None
    rateLimiter: PluginSpec | None = None
    drainTime: float = 30.0
    logLevel: str = "info"
    metricsListen: str | None = None
    processes: int | str = 1
    forkChildren: bool = True
    dropHeaders: tuple[str, ...] = ("bcc", "content-length", "resent-bcc", "return-path")
    maxHeaderSize: int = HEADER_SECTION_LIMIT


@dataclass(frozen=True)
class ListenerView:
    """What a local client needs to know of one listener (see L{LocalView}).

    @ivar endpoint: its Twisted server endpoint description (C{tcp:25}).
    @ivar mode: its role, one of L{mailrelay.receive.listener.LISTENER_MODES}.
    @ivar tlsMode: its C{tls_mode} when the file gives one, else C{None} (the relay then
        derives it from the mode and the certificate: implicit for C{submissions} only).
    @ivar proxyProtocol: its connections must start with a PROXY header.
    """

    endpoint: str
    mode: str = "relay"
    tlsMode: str | None = None
    proxyProtocol: bool = False


@dataclass(frozen=True)
class LocalView:
    """The few settings a local command (C{mailrelay-sendmail}) needs to reach the relay and
    speak for it, read as the relay reads them (see L{mailrelay.config.loadLocalView}).

    @ivar source: the configuration file as given, or C{None} for the embedded default.
    @ivar hostname: the relay's host name (the domain of local senders).
    @ivar maxMessageSize: the largest message the relay accepts, in bytes.
    @ivar listeners: its listeners, in the file's order.
    @ivar spoolDirectory: the spool directory it names (its path only: not checked), where
        the relay running on it publishes the listeners it is bound to
        (L{mailrelay.app.published}); C{None}: not known.
    """

    source: str | None
    hostname: str
    maxMessageSize: int
    listeners: tuple[ListenerView, ...]
    spoolDirectory: str | None = None

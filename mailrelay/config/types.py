"""The frozen types of the configuration, as L{mailrelay.config.loadConfig} returns them.

A field's default is the default of the key that fills it (L{mailrelay.config.keys} declares
no other, unless the field has none), so that a type built by hand, as tests do, is what the
loader gives for the keys left out.

Part of the config layer: it may import the values, L{mailrelay.smtp} and the stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mailrelay.config.values import IPNetwork, Smarthost
from mailrelay.smtp.clientsettings import ClientTimeouts

#: The values of a listener's C{tls_min_version}.
TLS_MIN_VERSIONS = ("TLSv1.2", "TLSv1.3")
#: What a listener does with a bare line feed (C{bare_newline}) or a NUL (C{nul_bytes}).
BARE_NEWLINE_CHOICES = ("reject", "normalize")


def _defaultClientTimeouts() -> dict[str, float]:
    """The SMTP client's default time-outs (L{ClientTimeouts}' defaults), by field name."""
    return {name: float(value) for name, value in dataclasses.asdict(ClientTimeouts()).items()}


@dataclass(frozen=True)
class SNICertificate:
    """A certificate a listener presents to clients asking for C{server_name} (TLS SNI).

    @ivar server_name: a lower-case host name, or C{"*.example.org"} for the names one label
        below C{example.org}.
    @ivar certificate: the absolute path of its PEM certificate chain.
    @ivar key: the absolute path of its PEM private key (the certificate's file when it holds
        both).
    """

    server_name: str
    certificate: str
    key: str


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP listener.

    @ivar endpoint: a Twisted server endpoint string, e.g. C{"tcp:2525:interface=127.0.0.1"}.
    @ivar bare_newline: what to do with a bare LF (or CR) in message data: C{"reject"} the
        message, or C{"normalize"} it to CRLF.
    @ivar add_message_id: add a C{Message-Id:} field to messages that lack one.
    @ivar add_date: add a C{Date:} field to messages that lack one.
    @ivar mode: one of L{mailrelay.receive.listener.LISTENER_MODES}.
    @ivar tls_mode: one of L{mailrelay.receive.listener.LISTENER_TLS_MODES}.
    @ivar tls_certificate: the absolute path of the PEM certificate chain, or C{None}.
    @ivar tls_key: the absolute path of the PEM private key (the certificate's file when it
        holds both), or C{None}.
    @ivar tls_min_version: one of L{TLS_MIN_VERSIONS}.
    @ivar tls_ciphers: an OpenSSL cipher string for TLS 1.2, or C{None} for the defaults.
    @ivar auth: AUTH is offered (PLAIN and LOGIN, checked against C{[auth]}).
    @ivar auth_without_tls: AUTH is offered and accepted without TLS too.
    @ivar tls_certificates: more certificates, chosen by the name the client asks for (SNI).
    @ivar max_connections: connections open at once on the listener (0: no limit).
    @ivar max_connections_per_client: connections open at once from one address (0: none).
    @ivar connection_rate_limit: connections from one address per C{rate_window} (0: none).
    @ivar message_rate_limit: MAIL commands from one address per C{rate_window} (0: none).
    @ivar user_message_rate_limit: MAIL commands from one authenticated user per
        C{rate_window} (0: none).
    @ivar rate_window: seconds.
    @ivar limit_exceptions: client networks exempt from the per-address limits, or C{None}
        for the relay networks.
    @ivar ipv6_prefix_length: IPv6 clients are counted together by network of this length.
    @ivar greet_pause: seconds to wait before the greeting; clients talking before it are
        refused (0: greet at once).
    @ivar reject_unauth_pipelining: refuse (554, close) commands pipelined without PIPELINING
        having been advertised, or after a command that must end a group, and input before
        the greeting.
    @ivar max_session_time: seconds a session may last in all (0: no limit).
    @ivar min_data_rate: bytes per second a client must keep up in DATA (0: only the data
        timeout).
    @ivar proxy_protocol: connections start with a PROXY protocol (v1 or v2) header.
    @ivar proxy_networks: the load balancers' networks, the only peers allowed to send one.
    @ivar nul_bytes: what to do with NUL bytes in message data: C{"reject"} the message, or
        C{"normalize"} it by removing them.
    """

    endpoint: str
    bare_newline: str = "reject"
    add_message_id: bool = True
    add_date: bool = True
    mode: str = "relay"
    tls_mode: str = "none"
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "TLSv1.2"
    tls_ciphers: str | None = None
    auth: bool = False
    auth_without_tls: bool = False
    tls_certificates: tuple[SNICertificate, ...] = ()
    max_connections: int = 100
    max_connections_per_client: int = 50
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    user_message_rate_limit: int = 0
    rate_window: float = 60.0
    limit_exceptions: tuple[IPNetwork, ...] | None = None
    ipv6_prefix_length: int = 84
    greet_pause: float = 0.0
    reject_unauth_pipelining: bool = True
    max_session_time: float = 1800.0
    min_data_rate: int = 500
    proxy_protocol: bool = False
    proxy_networks: tuple[IPNetwork, ...] = ()
    nul_bytes: str = "reject"


@dataclass(frozen=True)
class AuthConfig:
    """SMTP AUTH on the listeners that offer it (C{[auth]}).

    @ivar passwordFile: the absolute path of the password file (C{user:argon2-hash} lines),
        or C{None} when a site checker is used instead.
    @ivar users: its users and hashes as read at start-up (not shown by C{repr}).
    @ivar mechanisms: the SASL mechanisms offered, a subset of C{("PLAIN", "LOGIN")}.
    @ivar throttleAfter: failures from one client address after which each further failure
        is answered C{failureDelay} seconds late.
    @ivar failureDelay: that delay in seconds.
    @ivar maxFailures: failures from one address after which AUTH is refused with 421 and
        the connection closed.
    @ivar failureWindow: seconds after an address's last failure when its failures are
        forgotten.
    @ivar senders: user name to the MAIL FROM addresses (C{"a@example.com"}) and domains
        (C{"@example.com"}) the user may use; users not listed may use any.
    @ivar checker: the site credentials checker (C{[auth.checker]}: a plugin providing
        C{twisted.cred.checkers.ICredentialsChecker}) used instead of the password file, or
        C{None}.  Its C{timeout} is how long one check may take.
    """

    passwordFile: str | None
    users: dict = field(default_factory=dict, repr=False, hash=False, compare=False)
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    throttleAfter: int = 3
    failureDelay: float = 5.0
    maxFailures: int = 10
    failureWindow: float = 900.0
    senders: dict = field(default_factory=dict, hash=False)
    checker: PluginSpec | None = None


@dataclass(frozen=True)
class PluginSpec:
    """One entry of a plugin list (C{[[recipient_validators]]}, C{[[header_stampers]]},
    C{[[routers]]}).

    @ivar plugin: the plugin's name.
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds the plugin may take to answer (key C{timeout}, consumed by the
        loader, never passed to the plugin).
    @ivar key: where the entry came from, e.g. C{"recipient_validators[1]"}, for messages:
        C{error.within(file=config.source, key=spec.key)}.
    """

    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = 30.0
    key: str = ""



@dataclass(frozen=True)
class QueueConfig:
    """How long and how often the queue retries deliveries (C{[queue]}).

    The delay before each retry doubles from C{minBackoff} up to C{maxBackoff}
    (Postfix's C{minimal_backoff_time} and C{maximal_backoff_time}).

    @ivar minBackoff: seconds before the first retry.
    @ivar maxBackoff: the longest delay between retries, in seconds (>= C{minBackoff}).
    @ivar maxLifetime: seconds a message may stay queued before it bounces.
    @ivar bounceLifetime: the same for the relay's own bounce messages.
    @ivar delayWarning: seconds after which the sender is told that the message is delayed;
        C{0.0} for no delay warnings.
    @ivar activeLimit: the most messages in delivery at once.
    @ivar process: C{"separate"}: the queue manager and delivery run in a process of their own
        (two cores: acceptance and delivery in parallel, like Postfix's smtpd and qmgr);
        C{"inline"}: in the relay's process.
    @ivar hold: accept and spool mail but deliver none (like Postfix's hold queue) until the
        relay is restarted without it; for staged roll-outs and maintenance.
    @ivar postmaster: the canonical address (C{local@domain}) that gets bounces which cannot
        be returned to their sender, or C{None} to log and drop them.
    """

    minBackoff: float = 300.0
    maxBackoff: float = 4000.0
    maxLifetime: float = 432000.0
    bounceLifetime: float = 432000.0
    delayWarning: float = 0.0
    activeLimit: int = 1000
    postmaster: str | None = None
    hold: bool = False
    process: str = "separate"


@dataclass(frozen=True)
class TransportOptions:
    """How to talk to one SMTP or LMTP next hop (C{[smarthost]}, or an C{smtp} or C{lmtp}
    route).

    @ivar tls: one of L{mailrelay.interfaces.TLS_POLICIES}.
    @ivar caFile: the absolute path of a PEM CA bundle to verify certificates with, or
        C{None} for the system's trust store.
    @ivar username: the AUTH (PLAIN or LOGIN) user name, or C{None} for no AUTH.
    @ivar password: the AUTH password (read from C{password_file} when that was given), or
        C{None} without a user name.  Never shown by C{repr}.
    @ivar authWithoutTLS: whether AUTH may be used on a connection without TLS.
    """

    tls: str = "may"
    caFile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authWithoutTLS: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    """How outgoing mail is delivered (C{[delivery]}).

    @ivar heloName: the name this relay gives in EHLO/HELO/LHLO, or C{None} for its
        host name.
    @ivar tls: the TLS policy (one of L{mailrelay.interfaces.TLS_POLICIES}) for delivery to
        MX hosts, and the default of C{smtp} routes.
    @ivar caFile: the absolute path of a PEM CA bundle, or C{None} for the system's trust
        store; the default of C{smtp} routes.
    @ivar destinationConcurrency: the most connections to one destination at once.
    @ivar connectionCacheTime: seconds an idle connection is kept for reuse (C{0.0}: never).
    @ivar timeouts: the SMTP client's time-outs in seconds, by the names of
        C{mailrelay.smtp.clientsettings.ClientTimeouts}' fields: C{connect}, C{greeting}, C{ehlo},
        C{starttls}, C{auth}, C{mail}, C{rcpt}, C{dataInit}, C{dataBlock}, C{dataDone},
        C{rset}, C{quit} (all of them, always).
    """

    heloName: str | None = None
    tls: str = "may"
    caFile: str | None = None
    destinationConcurrency: int = 20
    connectionCacheTime: float = 2.0
    timeouts: dict[str, float] = field(default_factory=_defaultClientTimeouts, hash=False)


@dataclass(frozen=True)
class RouteConfig:
    """One C{[[routes]]} table: where mail for some domains goes.

    @ivar domain: the normalised domain matched: C{"example.org"} (that domain only),
        C{".example.org"} (its subdomains only) or C{"*"} (every domain: the default route).
    @ivar backend: C{"smtp"}, C{"lmtp"}, C{"maildir"}, C{"discard"} or the name of a
        L{BackendSpec}.
    @ivar nexthop: the backend's destination, normalised, or C{None}:
        - C{smtp}: a smarthost in L{parseSmarthost}'s notation, as C{str(Smarthost)} writes it
          (C{"[mx.example.org]:25"}), or C{None} to look up the recipient domain's MX hosts;
        - C{lmtp}: C{"host:port"} (C{"[2001:db8::1]:port"} for IPv6; never an MX lookup) or
          C{"unix:/absolute/path"};
        - C{maildir}: an absolute directory template that may hold C{{local}}, C{{domain}}
          and C{{address}};
        - C{discard} and site backends: C{None}.
    @ivar options: the transport options of an C{smtp} or C{lmtp} route (for C{smtp} the
        C{tls} and C{ca_file} not given default to C{[delivery]}'s); C{None} for other
        backends.
    @ivar key: where the route came from, e.g. C{"routes[2]"}.
    """

    domain: str
    backend: str
    nexthop: str | None = None
    options: TransportOptions | None = None
    key: str = ""


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
    @ivar relayNetworks: clients in these networks may relay to any domain.
    @ivar acceptDomains: domains (normalised) accepted from anyone.
    @ivar smarthost: where outgoing mail goes, or C{None} for direct MX delivery.
    @ivar maxMessageSize: the largest message accepted, in bytes.
    @ivar maxRecipients: the most recipients accepted for one message.
    @ivar idleTimeout: seconds a client may stay silent between commands.
    @ivar dataTimeout: seconds a client may stay silent while sending message data.
    @ivar maxErrors: errors in one session before it is closed with 421.
    @ivar maxHops: the most C{Received:} fields a message may carry (mail loops).
    @ivar reverseDNS: look up the client's name (forward-confirmed) for C{Received:}.
    @ivar listeners: where to accept SMTP connections.
    @ivar recipientValidators: the recipient validator plugins, in order.
    @ivar headerStampers: the header stamper plugins, in order.
    @ivar queue: retry and lifetime settings of the queue.
    @ivar delivery: how outgoing mail is delivered.
    @ivar smarthostOptions: the transport options for C{smarthost}.
    @ivar nameservers: C{(address, port)} of the DNS resolvers to use instead of the
        system's (C{/etc/resolv.conf}); C{()} for the system's.
    @ivar routes: the per-domain routes, in the file's order.
    @ivar backends: the site delivery backends.
    @ivar routers: the router plugins (providing L{mailrelay.interfaces.IRouter}) asked, in
        order, before C{routes}.
    @ivar auth: SMTP AUTH settings, or C{None} without an C{[auth]} table.
    @ivar rateLimiter: the plugin (providing L{mailrelay.interfaces.IRateLimiter}) keeping the
        listeners' limit counters, shared by several relays, or C{None} for the in-memory
        default; its C{timeout} is how long one answer may take.
    @ivar drainTime: seconds a stopping relay lets sessions in DATA finish their message,
        and then deliveries in flight finish and be recorded.
    """

    source: str | None
    configDir: Path
    hostname: str
    spoolDirectory: Path
    minFreeSpace: int
    relayNetworks: tuple[IPNetwork, ...]
    acceptDomains: tuple[str, ...]
    smarthost: Smarthost | None
    maxMessageSize: int
    maxRecipients: int
    idleTimeout: float
    dataTimeout: float
    maxErrors: int
    maxHops: int
    reverseDNS: bool
    listeners: tuple[ListenerConfig, ...]
    recipientValidators: tuple[PluginSpec, ...]
    headerStampers: tuple[PluginSpec, ...]
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    smarthostOptions: TransportOptions = TransportOptions()
    nameservers: tuple[tuple[str, int], ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    backends: tuple[BackendSpec, ...] = ()
    routers: tuple[PluginSpec, ...] = ()
    spoolSync: str = "syncfs"
    auth: AuthConfig | None = None
    rateLimiter: PluginSpec | None = None
    drainTime: float = 30.0


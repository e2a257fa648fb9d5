"""The checks of the configuration that involve several keys, one function per table
(L{mailrelay.config.schema.Table.check}), and the parsers of values only one table holds.

Each check sees the table's keys read (L{Reading.fields}, by field), the table as written
(to tell a key given from a default) and where it is; it refuses what does not go together,
works out the defaults that depend on other keys, and loads what must be loaded at start-up
(certificates, the password file), so that a configuration that loads is one that works.

Part of the config layer: it may import the values, L{mailrelay.smtp} and the stages.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from functools import partial
from socket import AF_INET6, AF_UNIX
from typing import Any

from twisted.logger import Logger

from mailrelay.address import domainProblem, parseSenderPattern
from mailrelay.config.schema import At, Reading, given, tableOf
from mailrelay.config.types import SNICertificate
from mailrelay.config.values import (
    checked,
    fileName,
    nonEmpty,
    readSecret,
    string,
    stringList,
)
from mailrelay.delivery import BUILTIN_BACKENDS
from mailrelay.endpoints import ListeningSocket, listeningSocket
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import describeValue
from mailrelay.interfaces import PLATFORM_TRUST_STORE
from mailrelay.receive.auth import MECHANISMS, PasswordFileError, readPasswordFile
from mailrelay.receive.tls import (
    ServerTLS,
    SNIServerOptions,
    TLSConfigError,
    describeServerTLS,
    loadServerTLS,
)
from mailrelay.route.nexthop import (
    NULL_SENDER_KEY,
    SMTPNexthop,
    checkMaildirTemplate,
    parseLMTPNexthop,
    parseNameserver,
    parseSMTPNexthop,
)
from mailrelay.route.table import RoutingTable

log = Logger()

# ---------------------------------------------------------------------------------------------
# [dns], [queue], [delivery], [smarthost] and a route's transport keys


def smarthost(value: Any, at: At) -> SMTPNexthop | None:
    """The smarthost, or an smtp route's next hop (see L{parseSMTPNexthop}); C{""} means
    none."""
    text = string(value, at)
    return checked(partial(parseSMTPNexthop, what="smarthost"))(text, at) if text else None


def fallbackRelay(value: Any, at: At) -> tuple[str, ...]:
    """C{fallback_relay}: a non-empty array of SMTP next hops (as a smarthost is written:
    C{"[relay.example]:587"}, C{"relay.example"} for its MX hosts), each normalised and
    kept once, in order (Postfix's C{smtp_fallback_relay}).  An empty array is refused:
    leave the key out for none."""
    relays: list[str] = []
    for where, text in stringList(value, at):
        relay = str(checked(partial(parseSMTPNexthop, what="fallback relay"))(text, where))
        if relay not in relays:
            relays.append(relay)
    if not relays:
        raise at.error(
            'must list at least one SMTP next hop (e.g. ["[relay.example]:587"]), not []: '
            "leave it out for no fallback relay"
        )
    return tuple(relays)


def sourceAddress(version: int) -> Callable[[Any, At], str | None]:
    """C{[delivery]}'s C{source_address} (C{version} 4) or C{source_address6} (6): an IP
    address of that version (C{"[...]"} allowed, as Postfix's C{smtp_bind_address}),
    normalised, or C{""} for none (C{None}).  Bound once now, so that an address this host
    does not have is refused at start-up, naming the key (Postfix finds out at each
    connection, and logs a warning)."""
    key, other = ("source_address", "source_address6") if version == 4 else (
        "source_address6", "source_address")

    def parse(value: Any, at: At) -> str | None:
        text = string(value, at)
        if not text:
            return None
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            raise at.error(f"{describeValue(text)} is not an IPv{version} address") from None
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            raise at.error(
                f"{describeValue(text)} is an IPv4-mapped address (connections from it reach "
                f"no IPv6 address): give {mapped} as source_address"
            )
        if address.version != version:
            raise at.error(
                f"{describeValue(text)} is an IPv{address.version} address: give it as "
                f"{other} ({key} is the source of the connections to IPv{version} addresses)"
            )
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((str(address), 0))
        except OSError as e:
            raise at.error(
                f"{describeValue(text)} cannot be bound: this host has no such address "
                f"({e.strerror or e}); give one of its own addresses, or remove {key}"
            ) from None
        return str(address)

    return parse


def nameservers(value: Any, at: At) -> tuple[tuple[str, int], ...]:
    """The C{dns.nameservers} array: C{(address, port)} pairs, each once."""
    result: list[tuple[str, int]] = []
    seen: dict[tuple[str, int], str] = {}
    for where, text in stringList(value, at):
        server = checked(parseNameserver)(text, where)
        if server in seen:
            raise where.error(f"{describeValue(text)} is already listed as {seen[server]}")
        seen[server] = where.key
        result.append(server)
    return tuple(result)


def checkQueue(r: Reading) -> None:
    """The backoff's bounds go together; C{bounce_lifetime}'s default is at most
    C{max_lifetime}; the queue manager's stop waits C{drain_time}."""
    r.fields["stopTimeout"] = r.at.scope["drainTime"]
    if not r.given("bounce_lifetime"):
        # (Given larger, it is kept: the relay says max_lifetime is used instead.)
        r.fields["bounceLifetime"] = min(r.fields["bounceLifetime"], r.fields["maxLifetime"])
    minBackoff, maxBackoff = r.fields["minBackoff"], r.fields["maxBackoff"]
    if maxBackoff < minBackoff:
        if r.given("max_backoff"):
            raise r.error(
                "max_backoff",
                f"must be at least {r.key('min_backoff')} ({minBackoff:g}), not "
                f"{describeValue(r.raw['max_backoff'])}",
            )
        raise r.error(
            "min_backoff",
            f"must be at most {r.key('max_backoff')} ({maxBackoff:g}, the default), not "
            f"{describeValue(r.raw['min_backoff'])}",
        )


def checkDelivery(r: Reading) -> None:
    """The client's name is the relay's unless C{helo_name} gives another."""
    if r.fields["heloName"] is None:
        r.fields["heloName"] = r.at.scope["hostname"]


def checkTransport(r: Reading) -> None:
    """A user name goes with one password (read from C{password_file} now), and with TLS or
    C{auth_without_tls}."""
    fields, key = r.fields, r.key
    username, password = fields["username"], fields["password"]
    passwordFile = fields.pop("passwordFile")
    fileText = r.raw.get("password_file")
    if passwordFile is not None and password is not None:
        raise r.error(
            "password_file",
            f"{describeValue(fileText)} is given together with {key('password')}: "
            "give only one of them",
        )
    if passwordFile is not None:
        if username is None:
            raise r.error(
                "password_file",
                f"{describeValue(fileText)} is given without {key('username')}: "
                "set the user name too, or remove the password",
            )
        password = fields["password"] = readSecret(passwordFile, r.at.child("password_file"))
    elif password is not None and username is None:
        raise r.error(
            "password",
            f"is given without {key('username')}: set the user name too, or remove "
            "the password (the value is not shown here)",
        )
    if username is None:
        return
    if password is None:
        raise r.error(
            "username",
            f"{describeValue(username)} needs a password: set "
            f"{key('password_file')} (or {key('password')})",
        )
    if fields["tls"] == "none" and not fields["authWithoutTLS"]:
        raise r.error(
            "username",
            f"{describeValue(username)} could never log in: {key('tls')} is \"none\" "
            f"and {key('auth_without_tls')} is false (AUTH is never sent without TLS "
            "unless auth_without_tls = true)",
        )


# ---------------------------------------------------------------------------------------------
# [[listeners]]


def checkListener(r: Reading) -> None:
    """A listener's TLS, AUTH and PROXY keys go together; its certificates load; the relay's
    settings a listener runs with join its own."""
    _listenerTLS(r)
    _loadListenerCertificates(r)
    _listenerAuth(r)
    proxy = r.fields["proxyProtocol"]
    if r.given("proxy_networks") and not proxy:
        raise r.error(
            "proxy_networks",
            f"{describeValue(r.raw['proxy_networks'])} has no effect without "
            "proxy_protocol = true",
        )
    if proxy and r.fields["name"].startswith("ssl:"):
        raise r.error(
            "proxy_protocol",
            f"= true with the TLS endpoint {describeValue(r.fields['name'])}: the PROXY "
            "header comes before TLS, which that endpoint starts at the first byte; use a "
            '"tcp:" endpoint with tls_mode = "implicit"',
        )
    if proxy and not r.fields["proxyNetworks"]:
        raise r.error(
            "proxy_networks",
            "is required with proxy_protocol = true: the networks of the load balancers "
            'allowed to send PROXY headers (e.g. ["10.0.0.0/8"]); a PROXY header from '
            "anyone else could claim any client address",
        )
    if r.fields["binaryMIME"] and not r.fields["chunking"]:
        raise r.error(
            "binarymime",
            "= true needs chunking = true: a BINARYMIME message can only come by BDAT "
            "(RFC 3030)",
        )
    _relaySettings(r)


def _relaySettings(r: Reading) -> None:
    """What a listener takes from the rest of the file: the relay's host name, the session
    limits of C{[limits]}, the relay networks as the exceptions to its limits unless it
    names its own, and the time the rate limiter's answers may take."""
    scope, fields = r.at.scope, r.fields
    for name in ("hostname", "maxMessageSize", "maxRecipients", "maxErrors", "softErrorLimit",
                 "errorSleepTime", "junkCommandLimit", "recipientOvershootLimit"):
        fields[name] = scope[name]
    fields["idleTimeout"], fields["dataTimeout"] = scope["idleTimeout"], scope["dataTimeout"]
    if not r.given("limit_exceptions"):
        fields["limitExceptions"] = scope["relayNetworks"]
    if scope["rateLimiter"] is not None:
        fields["limiterTimeout"] = scope["rateLimiter"].timeout


def _listenerTLS(r: Reading) -> None:
    """The TLS mode (and its default) goes with the mode, the certificate and the endpoint."""
    fields = r.fields
    mode, certificate = fields["mode"], fields.get("tlsCertificate")
    if r.given("tls_key") and certificate is None:
        raise r.error(
            "tls_key",
            f"{describeValue(r.raw['tls_key'])} is given without {r.key('tls_certificate')}",
        )
    if certificate is not None and not r.given("tls_key"):
        fields["tlsKey"] = certificate  # one file holding both
    if not r.given("tls_mode"):
        if mode == "submissions":
            fields["tlsMode"] = "implicit"
        else:
            fields["tlsMode"] = "starttls" if certificate is not None else "none"
    tlsMode = fields["tlsMode"]
    if mode == "submissions" and tlsMode != "implicit":
        raise r.error(
            "tls_mode",
            f'must be "implicit" for a "submissions" listener (RFC 8314), not '
            f"{describeValue(tlsMode)}",
        )
    if tlsMode == "none":
        if certificate is not None:
            raise r.error(
                "tls_certificate",
                f'{describeValue(r.raw["tls_certificate"])} is given, but tls_mode is "none": '
                'remove the certificate or set tls_mode = "starttls" or "implicit"',
            )
        for name in ("tls_min_version", "tls_ciphers"):
            if r.given(name):
                raise r.error(
                    name,
                    f"{describeValue(r.raw[name])} has no effect on a listener without TLS "
                    "(set tls_certificate too)",
                )
    elif certificate is None:
        submissions = ' (a "submissions" listener is TLS from the first byte)'
        raise r.error(
            "tls_certificate",
            f"is required with tls_mode = {describeValue(tlsMode)}"
            + (submissions if mode == "submissions" else "")
            + ": the PEM file of the server's certificate chain",
        )
    if tlsMode == "implicit" and fields["name"].startswith("ssl:"):
        raise r.error(
            "tls_mode",
            f'"implicit" with the TLS endpoint {describeValue(fields["name"])} would be '
            'TLS twice: use a "tcp:" endpoint (the certificate comes from tls_certificate)',
        )


#: Which key a certificate's problem (L{TLSConfigError.setting}) is reported at.
_TLS_SETTING_KEYS = {
    "certificate": "tls_certificate",
    "ciphers": "tls_ciphers",
    "version": "tls_min_version",
}


class _NotLoaded:
    """The TLS options of a listener whose certificates a process did not load
    (C{loadConfig(..., listenerTLS=False)}): any use of them is a bug, said so."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the listeners' certificates are not loaded in this process")


_NOT_LOADED = _NotLoaded()


def _loadListenerCertificates(r: Reading) -> None:
    """Load the certificate and the SNI certificates now, each with its key, once: the
    listener keeps them (L{ListenerConfig}) and its TLS options are made of them."""
    fields = r.fields
    certificate, key = fields.pop("tlsCertificate", None), fields.pop("tlsKey", None)
    sni: tuple[SNICertificate, ...] = fields.pop("tlsCertificates", ())
    options = {
        "minVersion": fields.pop("tlsMinVersion"),
        "ciphers": fields.pop("tlsCiphers", None),
    }
    if r.at.source.relayFiles:  # (an acceptor process: it serves what the relay serves)
        options["files"] = r.at.source.relayFiles
    if not r.at.source.listenerTLS:  # (a process that serves no listener)
        if certificate is not None:
            fields["tlsOptions"] = _NOT_LOADED
        if fields["name"].startswith("ssl:"):
            fields["endpointTLS"] = _NOT_LOADED
        return
    if fields["name"].startswith("ssl:"):
        fields["endpointTLS"], files = _endpointTLS(r)
        fields["endpointCertificate"] = _endpointCertificate(fields["name"],
                                                             fields["endpointTLS"])
        fields["endpointCertificate"].files = files
    if certificate is not None:
        try:
            tls = loadServerTLS(certificate, key, **options)
        except TLSConfigError as e:
            if e.setting == "key":
                at = "tls_key" if r.given("tls_key") else "tls_certificate"
            else:
                at = _TLS_SETTING_KEYS[e.setting]
            raise r.error(at, str(e)) from None
        fields["certificate"] = tls
        fields["tlsOptions"] = tls.options
    if not r.given("tls_certificates"):
        return
    if certificate is None:
        raise r.error(
            "tls_certificates",
            "needs tls_certificate too: the certificate for clients that ask for no "
            "name, or for a name not listed",
        )
    loaded = []
    for index, entry in enumerate(sni):
        try:
            tls = loadServerTLS(entry.certificate, entry.key, **options)
        except TLSConfigError as e:
            keyGiven = "key" in r.raw["tls_certificates"][index]
            at = "key" if e.setting == "key" and keyGiven else "certificate"
            raise r.at.child("tls_certificates").item(index).child(at).error(str(e)) from None
        loaded.append((entry.serverName, tls))
    fields["sniCertificates"] = tuple(loaded)
    byName = {name: tls.options for name, tls in loaded}
    fields["tlsOptions"] = SNIServerOptions(fields["tlsOptions"], byName)


def _endpointTLS(r: Reading) -> tuple[Any, dict[str, bytes]]:
    """The TLS options of the C{ssl:} endpoint of the listener (as Twisted's, made of its
    C{privateKey=}, C{certKey=}, C{extraCertChain=} ... files, read now, or the relay's
    bytes of them in an acceptor process), and those bytes by file: served by the
    listener's factory, so that each load of the configuration (a reload) reads the files
    again, as C{tls_certificate}'s."""
    from mailrelay.receive.tls import loadEndpointTLS

    name = r.fields["name"]
    try:
        return loadEndpointTLS(name, r.at.source.relayFiles)
    except Exception as e:  # (OpenSSL's errors: a file it cannot read, a key not the cert's)
        raise r.error("endpoint", f"{describeValue(name)}: cannot load its certificate or "
                      f"key: {e!r}") from None


def _endpointCertificate(name: str, options: Any) -> ServerTLS:
    """What the log says of the certificate of the C{ssl:} endpoint C{name} (its subject,
    end of validity, an expired one), as of C{tls_certificate}'s."""
    from twisted.internet import endpoints

    given = endpoints._parse(name)[1]
    certificateFile = given.get("certKey") or given.get("privateKey") or "server.pem"
    return describeServerTLS(options, certificateFile)


def _listenerAuth(r: Reading) -> None:
    """AUTH (on by default on submission listeners) needs C{[auth]}, and TLS (C{tls_mode},
    or an C{ssl:} endpoint) unless C{auth_without_tls}."""
    fields = r.fields
    mode = fields["mode"]
    if not r.given("auth"):
        fields["auth"] = mode != "relay"
    if fields["auth"]:
        if r.at.scope["auth"] is None:
            raise r.error(
                "auth",
                ("a submission listener needs AUTH: " if mode != "relay" else "")
                + "AUTH needs an [auth] table with a password_file",
            )
        tlsEndpoint = fields["name"].startswith("ssl:")  # TLS from the first byte, its own
        if fields["tlsMode"] == "none" and not tlsEndpoint and not fields["authWithoutTLS"]:
            raise r.error(
                "auth",
                "no client could ever log in: the listener has no TLS and AUTH is only "
                "accepted under TLS; set tls_certificate (STARTTLS), or auth_without_tls = "
                "true to let passwords cross the network in clear",
            )
    elif mode != "relay":
        raise r.error(
            "auth",
            f"must be true on a {describeValue(mode)} listener: submission requires "
            "AUTH (RFC 6409)",
        )
    elif r.given("auth_without_tls"):
        raise r.error(
            "auth_without_tls",
            f"{describeValue(fields['authWithoutTLS'])} has no effect on a listener "
            "without AUTH (auth = false)",
        )


def checkSNICertificate(r: Reading) -> None:
    """The key is in the certificate's file unless given."""
    r.fields.setdefault("key", r.fields["certificate"])


# ---------------------------------------------------------------------------------------------
# [auth]


def mechanisms(value: Any, at: At) -> tuple[str, ...]:
    """SASL mechanisms the server implements, in upper case, each once, at least one."""
    result: list[str] = []
    for where, name in stringList(value, at):
        if name.upper() not in MECHANISMS:
            raise where.error(
                f"unknown SASL mechanism {describeValue(name)}; the mechanisms are "
                + ", ".join(MECHANISMS)
            )
        if name.upper() not in result:
            result.append(name.upper())
    if not result:
        raise at.error("must name at least one mechanism, not []")
    return tuple(result)


def senders(value: Any, at: At) -> dict[str, tuple[str, ...]]:
    """C{[auth.senders]}: user = ["a@example.com", "@example.org"], normalised."""
    result: dict[str, tuple[str, ...]] = {}
    for user, patterns in tableOf(value, at).items():
        result[user] = tuple(
            _senderPattern(text, where) for where, text in stringList(patterns, at.child(user))
        )
    return result


def _senderPattern(text: str, at: At) -> str:
    """An address (C{"a@example.com"}) or a domain (C{"@example.com"}), normalised."""
    try:
        pattern = parseSenderPattern(text)
        if pattern is None:
            raise ValueError("the null sender <> is always allowed")
        return pattern
    except ValueError as e:
        raise at.error(
            f'{describeValue(text)} is not an address or "@domain": {domainProblem(e)}'
        ) from None


def passwordTable(value: Any, at: At) -> str:
    """C{[auth]}'s C{password_file}: the name of a file of C{user:hash} lines made with
    C{mailrelay-passwd}, as an absolute path; L{checkAuth} reads it (L{readPasswordFile})
    unless a site checker checks the users instead.  (Not a next hop's C{password_file},
    whose first line is a password: L{mailrelay.config.values.secretFileName}.)"""
    return fileName(value, at)


def checkAuth(r: Reading) -> None:
    """Users are checked by the password file (read now) or by a site checker, not both;
    the users bound to senders are the password file's."""
    users: dict[str, str] = {}
    if r.given("checker"):
        if r.given("password_file"):
            raise r.error(
                "checker",
                f"cannot be used with {r.key('password_file')}: users are checked either by "
                "the password file or by a site checker; remove one of the two",
            )
        r.fields["passwordFile"] = None
    elif not r.given("password_file"):
        raise r.error(
            "password_file",
            'is required in [auth]: the file of "user:hash" lines (see mailrelay-passwd), '
            "unless a site checker is configured in [auth.checker]",
        )
    elif r.at.source.listenerTLS:  # (a process serving no listener has no use for it)
        path = r.fields["passwordFile"]
        try:
            users = readPasswordFile(path)
        except PasswordFileError as e:
            relays = r.at.source.relayUsers.get(path)
            if relays is None:
                raise r.error("password_file", str(e)) from None
            # An acceptor process started (again) after the file was edited into a state
            # the relay refuses: it serves as the relay does, with the users it has.
            users = dict(relays)
            log.error("{problem}; serving with the {count} user(s) the relay has (the file "
                      "is read again when it changes)",
                      problem=str(r.error("password_file", str(e))), count=len(users))
        for user in r.fields["senders"]:
            if user not in users:
                raise r.at.child("senders").child(user).error(
                    f"user {describeValue(user)} is not in the password file"
                )
    r.fields["users"] = users


# ---------------------------------------------------------------------------------------------
# [[backends]] and [[routes]]


def backendName(value: Any, at: At) -> str:
    """A site backend's name: not empty, not a built-in backend's."""
    name = nonEmpty("a backend name")(value, at)
    if name.lower() in BUILTIN_BACKENDS:
        raise at.error(
            f"{describeValue(name)} is the name of a built-in backend; choose another "
            f"(the built-in backends are: {', '.join(BUILTIN_BACKENDS)})"
        )
    return name


def checkRoute(r: Reading) -> None:
    """The backend is known; the next hop and the transport keys are the backend's."""
    available = BUILTIN_BACKENDS + tuple(spec.name for spec in r.at.scope["backends"])
    if not r.given("backend"):
        raise r.error(
            "backend",
            "is required in each [[routes]] table; the backends available are: "
            + ", ".join(available),
        )
    backend = r.fields["backend"]
    if backend not in available:
        raise r.error(
            "backend",
            f"unknown backend {describeValue(backend)}; the backends available are: "
            + ", ".join(available)
            + " (site backends are defined in [[backends]] tables)",
        )
    r.fields["nexthop"] = _routeNexthop(r, backend)
    if backend == "smtp":
        delivery = r.at.scope["delivery"]
        caFile = PLATFORM_TRUST_STORE if delivery.caFile is None else delivery.caFile
        r.fields["options"] = r.readIncluded({"tls": delivery.tls, "caFile": caFile})
    elif backend == "lmtp":
        for name in ("source_address", "source_address6", "fallback_relay"):
            if r.given(name):
                raise r.error(
                    name,
                    f"{describeValue(r.raw[name])}: only smtp routes take {name}, not an "
                    '"lmtp" route ('
                    + ("LMTP deliveries go to no fallback relay)" if name == "fallback_relay"
                       else "LMTP connections are not bound to a source address)"),
                )
        r.fields["options"] = r.readIncluded()
    else:
        for name in r.table.includes[0].names:
            if r.given(name):
                shown = "" if name == "password" else f"{describeValue(r.raw[name])}: "
                raise r.error(
                    name,
                    f"{shown}only smtp and lmtp routes take {name}, not a "
                    f"{describeValue(backend)} route",
                )


def checkSenderRoute(r: Reading) -> None:
    """A sender route's next hop is an SMTP one, required; its transport keys are read as
    C{[smarthost]}'s, whose place it takes."""
    at = r.at.child("nexthop")
    nexthop = smarthost(r.raw.get("nexthop", ""), at) if r.given("nexthop") else None
    if nexthop is None:
        raise at.error(
            'is required in each [[sender_routes]] table: the SMTP server that sender\'s mail '
            'goes to, as a smarthost is written ("[smtp.example.net]:587")'
        )
    r.fields["nexthop"] = str(nexthop)
    r.fields["options"] = r.readIncluded()


def _routeNexthop(r: Reading, backend: str) -> str | None:
    """The route's C{nexthop}, read as its backend's notation and normalised."""
    at, given = r.at.child("nexthop"), r.given("nexthop")
    if backend == "smtp":
        nexthop = smarthost(r.raw.get("nexthop", ""), at)
        return None if nexthop is None else str(nexthop)
    if backend == "lmtp":
        if not given:
            raise at.error(
                'is required for an lmtp route: "host:port", "[host]:port" or '
                '"unix:/path/to/socket"'
            )
        return str(checked(parseLMTPNexthop)(r.raw["nexthop"], at))
    if backend == "maildir":
        if not given:
            raise at.error(
                "is required for a maildir route: a directory, which may hold "
                '{local}, {domain} and {address} (e.g. "/var/mail/{domain}/{local}")'
            )
        checked(checkMaildirTemplate)(r.raw["nexthop"], at)
        return at.path(r.raw["nexthop"])
    if given:
        what = (
            'a "discard" route'
            if backend == "discard"
            else f"a route to site backend {describeValue(backend)} (its options are "
            "in its [[backends]] table)"
        )
        raise at.error(
            f"{describeValue(r.raw['nexthop'])} is not allowed: {what} takes no nexthop"
        )
    return None


def checkTop(r: Reading) -> None:
    """The checks of the whole file: L{checkSockets} and L{checkPostmasterRoute}."""
    checkSockets(r)
    checkPostmasterRoute(r)


def checkPostmasterRoute(r: Reading) -> None:
    """C{[queue] postmaster} at this relay's own host name (a bare C{"postmaster"} is, as
    Postfix appends $myorigin, by default $myhostname) must be routed by something other than
    that name's MX lookup: a C{[[routes]]} rule (for it, its parent domain or C{"*"} with a
    next hop), the smarthost or a router plugin.  The relay has no local delivery (Postfix
    delivers postmaster@$myhostname locally: $myhostname is in mydestination), so the mail
    to postmaster it accepts from anyone (RFC 5321 4.5.1) and the notices of failed bounces
    would go to the host name's MX hosts, normally this very relay: a loop, nobody reached."""
    postmaster, hostname = r.fields["queue"].postmaster, r.fields["hostname"]
    if postmaster is None or not routedByOwnMX(
        postmaster, hostname, r.fields["routes"], r.fields["smarthost"], r.fields["routers"]
    ):
        return
    raise r.at.child("queue").child("postmaster").error(
        f"{describeValue(r.raw['queue']['postmaster'])} is {postmaster}, at this relay's own "
        f"host name, which nothing routes but its MX lookup (normally this relay: a mail "
        f"loop, reaching nobody; the relay delivers nothing locally): give an address "
        f'elsewhere ("postmaster@example.com"), or a [[routes]] rule for "{hostname}" to '
        f"the mailbox's host (smtp or lmtp with a nexthop, maildir), or a smarthost"
    )


def routedByOwnMX(address: str, hostname: str, routes: Any, smarthost: Any,
                  routers: Any) -> bool:
    """Whether mail to C{address}, at this relay's own C{hostname}, goes nowhere but to that
    name's MX hosts (normally this very relay): no C{[[routes]]} rule (for it, its parent
    domain or C{"*"} with a next hop), no smarthost and no router plugin routes it (for a
    sender without a sender route: L{postmasterRoutedByOwnMX} asks for any sender)."""
    if address.rpartition("@")[2] != hostname or routers:
        return False
    table = RoutingTable(routes, smarthost=smarthost)
    return _byOwnMX(table.route(None, Recipient(address)), hostname)


def _byOwnMX(route: Any, hostname: str) -> bool:
    """Whether C{route} is the MX lookup of C{hostname}."""
    if route.backend != "smtp":
        return False
    nexthop = parseSMTPNexthop(route.nexthop)
    return nexthop.mxLookup and nexthop.host == hostname


def postmasterRoutedByOwnMX(config: Any) -> Callable[[str | None], bool] | None:
    """Whether mail to postmaster at the host name of C{config} (a L{Config}) has nowhere to
    go, as a function of its sender (C{None}: a sender without a sender route): no
    C{[queue] postmaster}, and the routing table -- asked as the delivery will ask it: a
    C{[[routes]]} rule for the name, then the sender's C{[[sender_routes]]} entry, then the
    smarthost, then the MX lookup (Postfix's trivial-rewrite resolve.c) -- routes it only
    by that name's MX lookup (normally this relay: a loop; the relay delivers nothing
    locally).  C{None} when it always has somewhere to go (C{[queue] postmaster} is set, or
    a router plugin, which the table cannot speak for, may route it)."""
    if config.queue.postmaster is not None or config.routers:
        return None
    hostname = config.hostname
    table = RoutingTable.fromConfig(config)
    recipient = Recipient(f"postmaster@{hostname}")

    def byOwnMX(sender: str | None) -> bool:
        envelope = None if sender is None else Envelope(sender=sender)
        return _byOwnMX(table.route(envelope, recipient), hostname)

    return byOwnMX


def postmasterHasNowhereToGo(config: Any) -> bool:
    """Whether mail to postmaster at the host name of C{config} (a L{Config}) has nowhere
    to go from a sender without a sender route (see L{postmasterRoutedByOwnMX})."""
    byOwnMX = postmasterRoutedByOwnMX(config)
    return byOwnMX is not None and byOwnMX(None)


def sendersRoutingPostmaster(config: Any) -> list[str]:
    """The C{[[sender_routes]]} entries of C{config} (as written) whose senders' mail to
    postmaster at its host name goes to their relay host, where that of other senders has
    nowhere to go (see L{postmasterRoutedByOwnMX})."""
    byOwnMX = postmasterRoutedByOwnMX(config)
    if byOwnMX is None or not byOwnMX(None):
        return []
    return [route.sender for route in config.senderRoutes
            if not byOwnMX(_someSender(route.sender))]


def _someSender(key: str) -> str:
    """A sender that the sender route C{key} (C{"user@domain"}, C{"@domain"}, C{"<>"}) is
    for."""
    if key == NULL_SENDER_KEY:
        return ""
    return "postmaster" + key if key.startswith("@") else key


def checkSockets(r: Reading) -> None:
    """No two listeners, nor the metrics server and a listener, on one socket, however their
    endpoints are spelled (C{tcp:25} and C{tcp:port=25}; a port on every address and on one
    of them): twistd could not start, and would say so naming neither key nor file."""
    listeners = r.fields.get("listeners") or ()
    fromCommandLine = given(r.at.source.overrides, "listen")
    places: list[tuple[At, str]] = []
    for index, listener in enumerate(listeners):
        at = (r.at.option("--listen") if fromCommandLine
              else r.at.child("listeners").item(index).child("endpoint"))
        places.append((at, listener.settings.name))
    metrics = r.fields.get("metricsListen")
    if metrics:
        places.append((r.at.child("metrics").child("listen"), metrics))
    seen: list[tuple[At, str, ListeningSocket]] = []
    for at, endpoint in places:
        bound = listeningSocket(endpoint)
        if bound is None or (bound.family != AF_UNIX and bound.port == 0):
            continue  # (not a socket of its own, or a port chosen at start)
        for firstAt, firstEndpoint, first in seen:
            if _clash(first, bound):
                if bound.family == AF_UNIX:
                    what, why = "the same socket file", ""
                elif bound.family == first.family:
                    what, why = f"the same port ({bound.port}) and address", ""
                else:
                    what = f"the same port ({bound.port})"
                    why = (": on every IPv6 address, it takes every IPv4 address too "
                           "(net.ipv6.bindv6only = 0)")
                raise at.error(
                    f"{describeValue(endpoint)} listens on {what} as {firstAt.key} "
                    f"({describeValue(firstEndpoint)}){why}"
                )
        seen.append((at, endpoint, bound))


def ipv6DualStack() -> bool:
    """Whether a socket on every IPv6 address takes the port on every IPv4 address too:
    Linux's C{net.ipv6.bindv6only = 0}, its default (Twisted does not set C{IPV6_V6ONLY})."""
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return f.read().strip() == "0"
    except OSError:
        return False  # (not Linux, or no IPv6: not known, not refused)


def _clash(a: ListeningSocket, b: ListeningSocket) -> bool:
    """Whether C{a} and C{b} cannot both be bound: one socket file, or one port of one
    family on one address or on every address, or of both families when the IPv6 one is on
    every address and the system makes that dual-stack (L{ipv6DualStack})."""
    if AF_UNIX in (a.family, b.family):
        return a.family == b.family and os.path.abspath(a.address) == os.path.abspath(b.address)
    if a.port != b.port:
        return False
    if a.family == b.family:
        return a.address == b.address or a.everyAddress or b.everyAddress
    six = a if a.family == AF_INET6 else b
    return six.everyAddress and ipv6DualStack()

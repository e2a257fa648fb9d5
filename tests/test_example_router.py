"""The example site router, C{examples/lmtp-domains} (its end-to-end test is in
tests/test_e2e_router.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import ConfigError, PermanentFailure, TransientFailure
from mailrelay.interfaces import IMailRelayPlugin, IRouter, PluginContext, Route
from tests.test_validators import loadExample

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lmtp-domains"

DOMAINS = """\
# domain              LMTP server, or REJECT / DEFER [text]
example.com           unix:/run/dovecot/lmtp
.example.com          [10.0.0.5]:24             # every subdomain of example.com
.mail.example.com     LMTP.example.net:2424
old.example.com       REJECT this domain is no longer served here
moving.example.com    defer
Bücher.example        [2001:db8::1]:24
[192.0.2.1]           127.0.0.1:24
"""


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example's module, imported from its directory as the relay would (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return importlib.import_module("lmtp_domains")


@pytest.fixture
def context(tmp_path: Path) -> PluginContext:
    return PluginContext(hostname="relay.test", configDir=tmp_path)


def built(example: ModuleType, context: PluginContext, text: str = DOMAINS) -> Any:
    (context.configDir / "domains").write_text(text, encoding="utf-8")
    return example.build({"file": "domains"}, context)


def route(router: Any, address: str) -> Any:
    return router.route(Envelope(sender="a@sender.test"), Recipient(address))


def test_dropin() -> None:
    """The dropin names a lazy IRouter plugin, and extends twisted.plugins (no __init__)."""
    assert not (EXAMPLE / "twisted" / "__init__.py").exists()
    assert not (EXAMPLE / "twisted" / "plugins" / "__init__.py").exists()
    dropin = loadExample("lmtp_domains_plugin", EXAMPLE / "twisted/plugins/lmtp_domains_plugin.py")
    plugin = dropin.lmtpDomains
    verifyObject(IMailRelayPlugin, plugin)
    assert (plugin.name, plugin.provides, plugin.factory) == (
        "lmtp-domains",
        IRouter,
        "lmtp_domains:build",
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("bob@example.com", Route("lmtp", "unix:/run/dovecot/lmtp")),
        ("bob@a.example.com", Route("lmtp", "10.0.0.5:24")),
        ("bob@b.a.example.com", Route("lmtp", "10.0.0.5:24")),
        ("bob@mail.example.com", Route("lmtp", "10.0.0.5:24")),
        ("bob@x.mail.example.com", Route("lmtp", "lmtp.example.net:2424")),
        ("bob@xn--bcher-kva.example", Route("lmtp", "[2001:db8::1]:24")),
        ("bob@[192.0.2.1]", Route("lmtp", "127.0.0.1:24")),
        ("bob@example.org", None),
        ("bob@notexample.com", None),
        ("bob@[192.0.2.2]", None),
        ("postmaster", None),
    ],
)
def test_routes(example: ModuleType, context: PluginContext, address: str, expected: Any) -> None:
    router = built(example, context)
    verifyObject(IRouter, router)
    assert route(router, address) == expected


def test_refusals(example: ModuleType, context: PluginContext) -> None:
    router = built(example, context)
    with pytest.raises(PermanentFailure) as bounced:
        route(router, "bob@old.example.com")
    assert (bounced.value.code, bounced.value.diagnostic) == (
        "5.1.2",
        "X-mailrelay; this domain is no longer served here",
    )
    with pytest.raises(TransientFailure) as deferred:
        route(router, "bob@moving.example.com")
    assert (deferred.value.code, deferred.value.diagnostic) == (
        "4.3.2",
        "X-mailrelay; domain moving.example.com is not accepting mail now",
    )
    # A subdomain of a refused domain is not refused (only ".old.example.com" would be).
    assert route(router, "bob@x.old.example.com") == Route("lmtp", "10.0.0.5:24")


def test_everyDomain(example: ModuleType, context: PluginContext) -> None:
    router = built(example, context, "* REJECT no mail here\nok.test unix:/lmtp\n")
    assert route(router, "a@ok.test") == Route("lmtp", "unix:/lmtp")
    with pytest.raises(PermanentFailure):
        route(router, "a@other.test")
    assert route(router, "postmaster") is None
    assert repr(router) == f"<LMTPDomains {context.configDir / 'domains'}: 2 domains>"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("example.com\n", "2: want a domain and an LMTP server (or REJECT or DEFER): 'example.com"),
        ("a..b unix:/x\n", "is not a valid domain"),
        ("example.com lmtp.example.net\n", "the port is missing"),
        ("example.com unix:relative\n", "must be absolute"),
        ("example.com 10.0.0.5:24 extra\n", "unexpected 'extra' after the LMTP server"),
        ("Example.COM unix:/x\nexample.com. REJECT\n", "3: 'example.com' is already on line 2"),
        ("example.com REJECT tab\there\n", "the text of REJECT must be printable"),
    ],
)
def test_badLines(
    example: ModuleType, context: PluginContext, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as e:
        built(example, context, "# comment\n" + text)
    assert e.value.key == "file"
    assert f"{context.configDir / 'domains'}:" in e.value.message
    assert fragment in e.value.message


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({}, "file", "missing required option 'file'"),
        ({"file": "domains", "extra": 1}, "extra", "unknown option 'extra' = 1"),
        ({"file": 3}, "file", "must be a file name (a string), not 3"),
        ({"file": "missing"}, "file", "No such file or directory"),
    ],
)
def test_badOptions(
    example: ModuleType, context: PluginContext, options: dict, key: str, fragment: str
) -> None:
    (context.configDir / "domains").write_text(DOMAINS, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        example.build(options, context)
    assert e.value.key == key
    assert fragment in e.value.message


def test_notUTF8(example: ModuleType, context: PluginContext) -> None:
    (context.configDir / "domains").write_bytes(b"caf\xe9.example unix:/x\n")
    with pytest.raises(ConfigError, match="cannot read .*domains.*utf-8"):
        example.build({"file": str(context.configDir / "domains")}, context)

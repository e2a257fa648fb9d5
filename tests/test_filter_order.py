"""The order of the message filters: a filter that rewrites addresses or header fields
(L{IRewritingFilter}) must come before every filter that signs the message
(L{ISigningFilter}), the relay's own (C{sender-canonical}, C{dkim-sign}) and a site's alike,
as each declares; a configuration putting one after the other is refused at start, naming
both entries and the file (RFC 6376 5.4: the signature covers the fields as they leave)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from mailrelay.app.plugins import availablePlugins, pluginBuilder
from mailrelay.builtin.canonical import CLASSES, SenderCanonical
from mailrelay.builtin.canonicalmap import MapFile
from mailrelay.builtin.dkim import DKIMSigner
from mailrelay.config import loadConfig
from mailrelay.config.plugins import buildHooks
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    CONTINUE,
    IMessageFilter,
    IRewritingFilter,
    ISigningFilter,
    MailRelayPlugin,
)


@implementer(IMessageFilter, IRewritingFilter)
class Rewriter:
    """A site's filter that rewrites From: (a list manager's "via" rewriting)."""

    def filterMessage(self, context: Any) -> Any:
        return CONTINUE


@implementer(IMessageFilter, ISigningFilter)
class Signer:
    """A site's own signing filter (an ARC sealer, a signing service's client)."""

    def filterMessage(self, context: Any) -> Any:
        return CONTINUE


@implementer(IMessageFilter, IRewritingFilter, ISigningFilter)
class RewritesThenSigns:
    """A site's filter that rewrites, then signs what it rewrote, in one step."""

    def filterMessage(self, context: Any) -> Any:
        return CONTINUE


@implementer(IMessageFilter)
class Tagger:
    """A site's filter that adds a field only (declares neither)."""

    def filterMessage(self, context: Any) -> Any:
        return CONTINUE


SITE = {
    name: MailRelayPlugin(name, IMessageFilter, "a site's filter", lambda o, c, k=kind: k())
    for name, kind in (("site-rewriter", Rewriter), ("site-signer", Signer),
                       ("site-rewrite-sign", RewritesThenSigns), ("site-tagger", Tagger))
}

ENTRIES = {
    "sender-canonical": '[[plugins]]\nplugin = "sender-canonical"\nmap = "canonical"\n',
    "dkim-sign": ('[[plugins]]\nplugin = "dkim-sign"\nkeys = [{domain = "example.com", '
                  'selector = "s", key_file = "ed.pem"}]\n'),
}


def _build(tmp_path: Path, *names: str) -> Any:
    """The relay process's plugins of a configuration whose [[plugins]] are C{names}."""
    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    (tmp_path / "ed.pem").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path = tmp_path / "relay.toml"
    path.write_text("".join(ENTRIES.get(n, f'[[plugins]]\nplugin = "{n}"\n') for n in names))
    config = loadConfig(str(path))
    build = pluginBuilder(config, Clock(), {**availablePlugins(), **SITE})
    return buildHooks(config, build, "relay")


def test_the_builtins_declare_what_they_do(tmp_path: Path) -> None:
    """dkim-sign signs; sender-canonical rewrites header fields as configured by default
    (and then declares it), the envelope sender only when so configured (and declares
    nothing then: RFC 6376 3.7, a signature does not cover the envelope)."""
    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    table = MapFile(str(tmp_path / "canonical"))
    for classes, rewrites in ((CLASSES, True), (("header_sender",), True),
                              (("envelope_sender",), False)):
        canonical = SenderCanonical(table, classes)
        assert verifyObject(IMessageFilter, canonical)
        assert IRewritingFilter.providedBy(canonical) is rewrites
        assert not ISigningFilter.providedBy(canonical)
    assert verifyClass(ISigningFilter, DKIMSigner)
    assert not IRewritingFilter.implementedBy(DKIMSigner)


@pytest.mark.parametrize(
    "names",
    [
        ("sender-canonical", "dkim-sign"),
        ("site-rewriter", "dkim-sign"),
        ("sender-canonical", "site-rewriter", "site-signer"),
        ("site-rewrite-sign",),
        ("sender-canonical", "site-rewrite-sign", "dkim-sign"),  # (two signatures, both good)
        ("dkim-sign", "site-tagger", "site-signer"),
    ],
)
def test_rewriting_before_signing_is_accepted(tmp_path: Path, names: tuple[str, ...]) -> None:
    hooks = _build(tmp_path, *names)
    assert [c.name for c in hooks.serving("message")] == list(names)


@pytest.mark.parametrize(
    ("names", "rewriter", "signer"),
    [
        (("dkim-sign", "sender-canonical"), "sender-canonical", "dkim-sign"),
        (("dkim-sign", "site-rewriter"), "site-rewriter", "dkim-sign"),
        (("site-signer", "sender-canonical"), "sender-canonical", "site-signer"),
        (("site-tagger", "site-signer", "site-tagger", "site-rewriter"), "site-rewriter",
         "site-signer"),
        (("site-rewrite-sign", "site-rewriter"), "site-rewriter", "site-rewrite-sign"),
        (("dkim-sign", "site-rewrite-sign"), "site-rewrite-sign", "dkim-sign"),
    ],
)
def test_rewriting_after_signing_is_refused(
    tmp_path: Path, names: tuple[str, ...], rewriter: str, signer: str
) -> None:
    """Refused whoever declares it, naming the file, both entries, and what each does."""
    with pytest.raises(ConfigError) as raised:
        _build(tmp_path, *names)
    at = f"plugins[{len(names) - 1}]"
    before = f"plugins[{names.index(signer)}]"
    assert str(raised.value) == (
        f"{tmp_path / 'relay.toml'}: {at}: {rewriter} must come before {signer} ({before}): "
        f"{rewriter} rewrites addresses or header fields and {signer} signs the message: "
        "the signature must cover them as they leave (RFC 6376 5.4)")

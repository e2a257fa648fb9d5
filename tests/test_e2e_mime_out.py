"""End-to-end, 8BITMIME downgrade on the way out (RFC 6152 section 3): the real C{twistd -n
mailrelay} delivering 8-bit mail to Postfix's smtpd told not to offer 8BITMIME
(C{smtpd_discard_ehlo_keywords = 8bitmime,smtputf8}: SMTPUTF8 implies 8BITMIME, RFC 6531
section 3.1): the 8-bit parts arrive quoted-printable or
base64, the rest as it was, and the relay logs C{conversion=7bit}; a DKIM-signed 8-bit
message, which conversion would break, is returned to its sender with 5.6.3.  To Postfix
offering 8BITMIME the same message goes unchanged, with C{BODY=8BITMIME}."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from tests.postfixpeer import DOMAIN, PostfixPeer, postfix  # noqa: F401 - fixture
from tests.test_e2e_outbound import (
    bounceID,
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    parseReport,
    relay,  # noqa: F401 - the relay fixture
    release,
    spooled,
    submit,
    waitEmpty,
    waitRemoved,
    waitResult,
)

MESSAGE = (
    b"From: <alice@sender.test>\r\nTo: <bob@postfix.test>\r\nSubject: 8-bit\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.\r\n"
    b"--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n\x80\x81\xfe\xff\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nplain ASCII, left alone\r\n"
    b"--B--\r\n"
)




def _routes(peer: PostfixPeer, tmp_path: Path) -> list[dict]:
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    (tmp_path / "mail" / "sender.test" / "alice").mkdir(parents=True, exist_ok=True)  # (a maildir route delivers only to users whose directory exists)
    return [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"},
            {"domain": "sender.test", "backend": "maildir", "nexthop": template}]


def _parts(content: bytes) -> list[tuple[str, str | None, bytes | None]]:
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    return [(p.get_content_type(), p.get("Content-Transfer-Encoding"),
             None if p.is_multipart() else p.get_payload(decode=True)) for p in msg.walk()]


def test_eight_bit_converted_for_a_hop_without_8bitmime(relay, dns, postfix,
                                                        tmp_path: Path) -> None:
    peer = postfix("smtpd_discard_ehlo_keywords=8bitmime,smtputf8")
    routes = _routes(peer, tmp_path)
    r = relay(config(dns, hold=True, routes=routes))
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"], MESSAGE,
                 mailOptions=("BODY=8BITMIME",))
    original = spooled(r, qid)
    release(r, config(dns, routes=routes))
    assert waitResult(r, qid, f"bob@{DOMAIN}")["status"] == "sent"
    r.waitForLog(rf"{qid}: conversion=7bit for 127\.0\.0\.1\[127\.0\.0\.1\] \(no 8BITMIME\): "
                 r"2 body part\(s\) encoded")
    waitRemoved(r, qid)
    (stored,) = peer.waitMailbox("bob")
    stored = stored.replace(b"\n", b"\r\n")
    assert stored.isascii()
    assert _parts(stored) == [
        ("multipart/mixed", None, None),
        ("text/plain", "quoted-printable", "Grüße aus Köln\r\n.".encode()),
        ("application/octet-stream", "base64", b"\x80\x81\xfe\xff"),
        ("text/plain", None, b"plain ASCII, left alone"),
    ]
    assert [p[2] for p in _parts(stored)] == [p[2] for p in _parts(original)]
    assert b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n=2E\r\n" in stored
    # The header section is the spooled one (Postfix's Return-Path/Delivered-To/Received
    # before it), but for the changed encoding of the multipart itself: none, then as now.
    assert stored.index(b"Subject: 8-bit\r\n") > 0
    waitEmpty(r)


def test_eight_bit_unchanged_for_a_hop_with_8bitmime(relay, dns, postfix,
                                                     tmp_path: Path) -> None:
    peer = postfix()
    r = relay(config(dns, routes=_routes(peer, tmp_path)))
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"], MESSAGE,
                 mailOptions=("BODY=8BITMIME",))
    assert waitResult(r, qid, f"bob@{DOMAIN}")["status"] == "sent"
    (stored,) = peer.waitMailbox("bob")
    assert MESSAGE.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] in stored
    assert "conversion=7bit" not in r.log()


def test_dkim_signed_eight_bit_is_returned(relay, dns, postfix, tmp_path: Path) -> None:
    peer = postfix("smtpd_discard_ehlo_keywords=8bitmime,smtputf8")
    r = relay(config(dns, routes=_routes(peer, tmp_path)))
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=s1; bh=x; b=y\r\n" + MESSAGE
    qid = submit(r, "alice@sender.test", [f"bob@{DOMAIN}"], signed,
                 mailOptions=("BODY=8BITMIME",))
    m = waitResult(r, qid, f"bob@{DOMAIN}")
    assert m["status"] == "bounced", m[0]
    assert m["diagnostic"] == (
        "X-mailrelay; 127.0.0.1[127.0.0.1] does not support 8BITMIME, and the message cannot "
        "be converted to 7 bits: the message is DKIM-signed, and converting it would break the "
        "signature")
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    box = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    (report,) = [p.read_bytes() for p in box.iterdir()]
    _, _, [block], _ = parseReport(report.split(b"\n", 2)[2].replace(b"\n", b"\r\n"))
    assert (block["Action"], block["Status"]) == ("failed", "5.6.3")
    # The relay's own verdict: no Remote-MTA (Postfix's smtp_mime_fail(), DSN_BY_LOCAL_MTA).
    assert "Remote-MTA" not in block, str(block)
    assert peer.mailbox("bob") == []
    waitEmpty(r)


def test_the_bounce_of_an_smtputf8_message_is_converted_for_a_hop_without_8bitmime(
        relay, dns, postfix) -> None:
    """Neither 8BITMIME nor SMTPUTF8 at the next hop: the SMTPUTF8 message is returned
    (5.6.7), and its bounce, which carries the original's header section as a
    message/global-headers part, goes out through the same hop converted (RFC 6533 lets
    that type be quoted-printable).  It was refused as an 8-bit message/* part and the
    bounce discarded: the sender never told (found by a bug hunt)."""
    peer = postfix("smtpd_discard_ehlo_keywords=8bitmime,smtputf8", mailboxes=("alice",))
    routes = [{"domain": DOMAIN, "backend": "smtp", "nexthop": f"[127.0.0.1]:{peer.port}"}]
    r = relay(config(dns, routes=routes))
    utf8 = ("From: <alice@postfix.test>\r\nTo: <j\u00f6rg@postfix.test>\r\n"
            "Subject: gr\u00fc\u00dfe\r\n\r\nhallo\r\n").encode()
    qid = submit(r, f"alice@{DOMAIN}", [f"j\u00f6rg@{DOMAIN}"], utf8,
                 mailOptions=("SMTPUTF8", "BODY=8BITMIME"))
    m = waitResult(r, qid, f"j\u00f6rg@{DOMAIN}")
    assert m["status"] == "bounced", m[0]
    dsnID = bounceID(r, qid)
    assert waitResult(r, dsnID, f"alice@{DOMAIN}")["status"] == "sent", r.log()
    (report,) = peer.waitMailbox("alice")
    report = report.replace(b"\n", b"\r\n")
    assert report.isascii()
    parts = _parts(report)
    headers = [p for p in parts if p[0] in ("message/global-headers", "message/global")]
    assert headers and headers[0][1] == "quoted-printable", parts
    assert b"Subject: gr=C3=BC=C3=9Fe\r\n" in report.split(b"message/global-headers", 1)[1]
    waitEmpty(r)

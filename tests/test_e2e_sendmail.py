"""End-to-end: C{mailrelay-sendmail}, and the real mail(1) commands pointed at it, submitting
to the real C{twistd -n mailrelay}, which relays to an aiosmtpd next hop (its smarthost).

The relay listens on a fixed port written in its configuration file (the command finds the
listener there, as it would in /etc/mailrelay.toml), found free a moment before.  The
command gets the file through C{$MAILRELAY_CONFIG}; C{HOME} is the test's directory (for
dead.letter).
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess, freePort, requireTool
from tests.test_e2e_outbound import Recorder, nexthop  # noqa: F401 (a fixture)

SENDMAIL = str(Path(sys.executable).with_name("mailrelay-sendmail"))
LOGIN = pwd.getpwuid(os.getuid()).pw_name


class Site:
    """A relay with its next hop, and how to run commands against it."""

    def __init__(self, relay: RelayProcess, hop: Recorder, home: Path) -> None:
        self.relay = relay
        self.hop = hop
        self.home = home
        self.config = relay.directory / "mailrelay.toml"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NAME", "MAILRC")}
        env.update(MAILRELAY_CONFIG=str(self.config), HOME=str(self.home), **extra)
        return env

    def run(self, argv: list[str], data: bytes | None = None, timeout: float = 60,
            **extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, input=data, capture_output=True, timeout=timeout,
                              env=self.env(**extra))


def startSite(relays: Any, nexthop: Any, tmp_path: Path, relayKeys: str = "",  # noqa: F811
              args: tuple[str, ...] = ()) -> Site:
    hop, hopPort = nexthop()
    for attempt in range(5):  # the free port may be taken before the relay binds it
        port = freePort()
        config = (f'hostname = "relay.test"\n[relay]\nsmarthost = "[127.0.0.1]:{hopPort}"\n'
                  f'{relayKeys}\n[spool]\ndirectory = "spool"\n'
                  f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
        relay = relays(config, name=f"relay{attempt}", defaults=False, args=args)
        try:
            relay.start()
        except AssertionError:
            if "Address already in use" in relay.log():
                continue
            raise
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        return Site(relay, hop, home)
    raise AssertionError("no free port for the relay")


@pytest.fixture
def site(relays: Any, nexthop: Any, tmp_path: Path) -> Site:  # noqa: F811
    return startSite(relays, nexthop, tmp_path)


def headerOf(content: bytes) -> str:
    return content.split(b"\r\n\r\n", 1)[0].decode("utf-8")


def fields(content: bytes, name: str) -> list[str]:
    """The values of header field C{name}, unfolded."""
    head = re.sub(r"\r\n[ \t]+", " ", headerOf(content))
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def test_mail_command_bsd_mailx(site: Site, tmp_path: Path) -> None:
    # bsd-mailx runs "sendmail -i -t" with To:, Cc: and Bcc: in the header; -v adds -v.
    mail = requireTool("bsd-mailx", "bsd-mailx")
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={SENDMAIL}\n")
    result = site.run([mail, "-v", "-s", "hello from mail", "-c", "cc@example.net",
                       "-b", "hidden@example.com", "user@example.org"],
                      b"Hi.\n.\nThe line above is a single dot.\n", MAILRC=str(rc))
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert f">>> MAIL FROM:<{LOGIN}@relay.test>" in err  # the SMTP dialogue, as sendmail -v
    queueID = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", err).group(1)
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert sorted(got.rcptTos) == ["cc@example.net", "hidden@example.com", "user@example.org"]
    assert got.mailFrom == f"{LOGIN}@relay.test"
    assert fields(got.content, "Subject") == ["hello from mail"]
    assert fields(got.content, "From") == [f"{LOGIN}@relay.test"]
    assert fields(got.content, "Bcc") == [] and b"hidden" not in got.content
    received = fields(got.content, "Received")
    assert received[0].startswith("from relay.test (localhost [127.0.0.1]) by relay.test "
                                  f"(mailrelay) with ESMTP id {queueID};")
    assert received[1].startswith(f"by relay.test (mailrelay-sendmail, from userid {os.getuid()});")
    assert len(fields(got.content, "Message-Id")) == 1 and len(fields(got.content, "Date")) == 1
    assert got.content.endswith(b"\r\n\r\nHi.\r\n.\r\nThe line above is a single dot.\r\n")
    site.relay.waitForLog(rf"{queueID}: from=<{LOGIN}@relay\.test> nrcpt=3 ")


def test_bare_names_get_the_hostname_the_relay_runs_with(
        relays: Any, nexthop: Any, tmp_path: Path) -> None:  # noqa: F811
    """A relay started with --hostname (not the file's hostname): sendmail qualifies bare
    names with the name the relay runs with (its greeting's), as Postfix's cleanup appends
    the running system's myorigin."""
    site = startSite(relays, nexthop, tmp_path, args=("--hostname", "started.test"))
    result = site.run([SENDMAIL, "-f", "root", "bob"], b"To: carol\n\nHi\n")
    assert result.returncode == 0, result.stderr
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert got.mailFrom == "root@started.test" and got.rcptTos == ["bob@started.test"]
    assert fields(got.content, "To") == ["carol@started.test"]
    assert fields(got.content, "From") == ["root@started.test"]


def test_mail_command_s_nail(site: Site) -> None:
    # s-nail runs "sendmail -i -- recipients...".
    snail = requireTool("s-nail", "s-nail")
    result = site.run([snail, "-n", "-S", f"mta={SENDMAIL}", "-s", "from s-nail",
                       "user@example.org"], b"Hello.\n", MAILRC="/dev/null")
    assert result.returncode == 0, result.stderr
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert got.rcptTos == ["user@example.org"]
    assert fields(got.content, "Subject") == ["from s-nail"]
    assert fields(got.content, "From") == [f"{LOGIN}@relay.test"]
    assert got.content.endswith(b"\r\n\r\nHello.\r\n")


def test_t_with_bcc_and_a_full_name(site: Site) -> None:
    message = (b"To: Bob <bob@example.org>\nCc: carol@example.org\nBcc: dave@example.net,\n"
               b" eve@example.net\nSubject: -t\n\nbody\n.\nnot sent\n")
    result = site.run([SENDMAIL, "-t", "-F", "Alice Liddell", "-f", "alice"], message)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert sorted(got.rcptTos) == ["bob@example.org", "carol@example.org", "dave@example.net",
                                   "eve@example.net"]
    assert got.mailFrom == "alice@relay.test"
    assert fields(got.content, "From") == ['Alice Liddell <alice@relay.test>']
    assert fields(got.content, "Bcc") == [] and b"dave" not in got.content
    assert b"eve" not in got.content
    assert got.content.endswith(b"\r\n\r\nbody\r\n")  # the single dot ended it (no -i)


def test_cron(site: Site) -> None:
    # Debian's cron: "sendmail -FCronDaemon -i -B8BITMIME -oem root", with its own header.
    message = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> job\n"
               "Content-Type: text/plain; charset=UTF-8\n\nrésumé\r\nprogress 10%\r50%\n"
               + "x" * 1500 + "\n").encode("utf-8")
    result = site.run([SENDMAIL, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], message)
    assert result.returncode == 0, result.stderr
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert got.rcptTos == ["root@relay.test"] and "BODY=8BITMIME" in got.mailOptions
    assert fields(got.content, "To") == ["root@relay.test"]
    assert fields(got.content, "From") == ["root@relay.test (Cron Daemon)"]  # as Postfix
    body = got.content.split(b"\r\n\r\n", 1)[1]
    assert body.startswith("résumé\r\nprogress 10%\r\n50%\r\n".encode())
    assert body.endswith(b"x" * 998 + b"\r\n " + b"x" * 502 + b"\r\n")


def test_bs_session(site: Site) -> None:
    # A whole session written at once, LF line ends: the relay sees one command at a time.
    session = (b"EHLO client.example\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.org>\n"
               b"DATA\nSubject: -bs\n\n..dotted\n.\nQUIT\n")
    result = site.run([SENDMAIL, "-bs"], session)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert replies[0] == "220 relay.test ESMTP mailrelay"
    assert "354 End data with <CR><LF>.<CR><LF>" in replies
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as \w+", replies[-3]), replies
    assert replies[-2:] == ["221 2.0.0 Bye", ""]
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert (got.mailFrom, got.rcptTos) == ("a@example.org", ["b@example.org"])
    assert got.content.endswith(b"\r\n\r\n.dotted\r\n")
    assert "SMTP protocol synchronization" not in site.relay.log()


def test_bs_bdat_and_a_last_line_without_its_end(site: Site) -> None:
    """-bs passes BDAT's chunk on as it is (CHUNKING is offered through the pipe), and a
    last command without a line end is ended (Postfix's smtpd takes it at the end of the
    input).  Both hung until the relay's idle timeout."""
    chunk = b"Subject: bdat\r\n\r\nCRLF\r\n"
    session = (b"EHLO client.example\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.org>\n"
               b"BDAT %d LAST\n" % len(chunk) + chunk + b"QUIT")
    result = site.run([SENDMAIL, "-bs"], session, timeout=20)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as \w+", replies[-3]), replies
    assert replies[-2:] == ["221 2.0.0 Bye", ""]
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert b"\r\nSubject: bdat\r\n" in got.content
    assert got.content.endswith(b"\r\n\r\nCRLF\r\n")


def test_bs_input_ending_in_data(site: Site) -> None:
    """-bs whose input ends in the middle of the message: the session ends at once, nothing
    is queued, and the command says so (exit 65).  It waited 30 s for the relay, then
    exited 0."""
    session = (b"EHLO me\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.org>\nDATA\n"
               b"Subject: x\n\nhello\n")
    started = time.monotonic()
    result = site.run([SENDMAIL, "-bs"], session)
    assert time.monotonic() - started < 10
    assert result.returncode == os.EX_DATAERR, result
    assert result.stderr.decode() == ("mailrelay-sendmail: the input ended in the middle of "
                                      "the message (after DATA); nothing was sent\n")
    assert b"354 " in result.stdout and b"queued as" not in result.stdout
    site.relay.waitForLog(r"message not completed, dropped")


def test_relay_down(site: Site, tmp_path: Path) -> None:
    site.relay.stop()
    body = tmp_path / "message"
    body.write_bytes(b"Subject: x\n\nnot lost\n")
    with open(body, "rb") as stdin:
        result = subprocess.run([SENDMAIL, "-i", "user@example.org"], stdin=stdin,
                                capture_output=True, timeout=60, env=site.env())
        offset = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
    assert result.returncode == 75  # EX_TEMPFAIL
    err = result.stderr.decode()
    assert err.startswith("mailrelay-sendmail: cannot connect to the relay at 127.0.0.1:")
    assert "is mailrelay running? Nothing was sent; try again later" in err
    assert offset == 0  # the input was not read: the caller still has it
    assert not (site.home / "dead.letter").exists()
    result = site.run([SENDMAIL, "-bs"], b"EHLO x\nQUIT\n")
    assert result.returncode == 75
    assert result.stdout == (b"421 4.3.2 relay.test mailrelay-sendmail: the relay is not "
                             b"running\r\n")


def test_closed_standard_input_is_an_empty_message(site: Site) -> None:
    """As Postfix's sendmail, which opens /dev/null on a closed descriptor 0, 1 or 2: it
    was a traceback (sys.stdin is None)."""
    result = site.run(["sh", "-c", f"exec {SENDMAIL} -i user@example.org <&- 2>&1"])
    assert (result.returncode, result.stdout) == (0, b"")
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert got.rcptTos == ["user@example.org"] and got.content.endswith(b"\r\n\r\n")


def test_refused_message_goes_to_dead_letter(site: Site) -> None:
    # 60 Received: fields: the relay refuses the message as a loop (554 5.4.6).
    message = b"".join(b"Received: from hop%d\n" % n for n in range(60)) + b"\nloop\n"
    result = site.run([SENDMAIL, "-i", "user@example.org"], message)
    assert result.returncode == os.EX_UNAVAILABLE, result.stderr
    err = result.stderr.decode().splitlines()
    assert err[0].startswith("mailrelay-sendmail: the message was refused: 554 5.4.6 ")
    assert err[1:] == ["mailrelay-sendmail: nothing was sent",
                       f"mailrelay-sendmail: the message was saved in {site.home}/dead.letter"]
    saved = (site.home / "dead.letter").read_bytes()
    assert saved.startswith(f"From {LOGIN}@relay.test ".encode()) and b"\nloop\n" in saved


def test_message_over_the_size_limit_goes_to_dead_letter(site: Site) -> None:
    """A message over [limits] message_size is refused without sending anything, and
    saved whole in ~/dead.letter, as every message read and not accepted is (it was
    dropped: cron's output gone)."""
    body = b"".join(b"line %d of the cron job's output\n" % n for n in range(5000))
    config = site.config.parent / "small.toml"
    # (On a spool no relay runs on: the command takes the file's listener and limit, not
    # those the running relay publishes in its spool.)
    config.write_text(site.config.read_text().replace('directory = "spool"',
                                                      'directory = "no-relay-here"')
                      + "\n[limits]\nmessage_size = 4096\n")
    result = site.run([SENDMAIL, "-C", str(config), "-i", "user@example.org"],
                      b"Subject: big\n\n" + body)
    assert result.returncode == os.EX_DATAERR, result.stderr
    err = result.stderr.decode().splitlines()
    assert err[0] == ("mailrelay-sendmail: message too large: the relay accepts at most 4096 "
                      "octets ([limits] message_size); nothing was sent"), err
    assert err[1] == f"mailrelay-sendmail: the message was saved in {site.home}/dead.letter"
    saved = (site.home / "dead.letter").read_bytes()
    assert saved.startswith(f"From {LOGIN}@relay.test ".encode())
    assert saved.endswith(b"\nSubject: big\n\n" + body + b"\n")


def test_refused_recipient(relays: Any, nexthop: Any, tmp_path: Path) -> None:  # noqa: F811
    # The relay network does not include loopback: only the accepted domain may be mailed.
    site = startSite(relays, nexthop, tmp_path,
                     'networks = ["192.0.2.0/24"]\naccept_domains = ["ok.example"]')
    result = site.run([SENDMAIL, "-i", "a@ok.example", "b@elsewhere.example"], b"x\n")
    assert result.returncode == os.EX_NOPERM, result.stderr
    assert result.stderr.decode().startswith(
        "mailrelay-sendmail: <b@elsewhere.example> refused: 554 5.7.1 ")
    assert site.hop.accepted == []


def test_bp_and_q(relays: Any, tmp_path: Path) -> None:
    """-bp lists the queue and -q flushes it, through the mailrelay command and the relay's
    control socket (the next hop is down: the message waits, deferred)."""
    down = freePort()  # nothing listens there: every attempt is refused
    keys = "[queue]\nmin_backoff = 3600\nmax_backoff = 7200\n"
    site = startSite(relays, lambda: (None, down), tmp_path, relayKeys=keys)
    result = site.run([SENDMAIL, "-i", "bob@example.org"], b"Subject: waits\n\nbody\n")
    assert result.returncode == 0, result.stderr

    def listing() -> str:
        result = site.run([SENDMAIL, "-bp"])
        assert result.returncode == 0, result.stderr
        return result.stdout.decode()

    deadline = time.monotonic() + 20
    while "connection refused by 127.0.0.1" not in (text := listing()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "connection refused by 127.0.0.1" in text, text
    assert text.startswith("-Queue ID-") and "-- 1 Kbytes in 1 Request." in text, text
    assert f"{LOGIN}@relay.test" in text and "bob@example.org" in text, text
    result = site.run([SENDMAIL, "-q"])
    assert result.returncode == 0, result.stderr
    assert "scheduled for delivery now: 1 message" in result.stdout.decode(), result.stdout


def test_submission_through_a_unix_socket_listener(relays: Any, nexthop: Any,
                                                   tmp_path: Path) -> None:  # noqa: F811
    """A client on a UNIX-domain socket is local, as Postfix's smtpd takes it (localhost,
    127.0.0.1): it may relay when the relay networks hold 127.0.0.1, and its Received: field
    says so.  It was known as "UNIXAddress(None)": never in the relay networks, so
    mailrelay-sendmail on such a listener could send to no other domain (554 5.7.1), and the
    field said "(unknown [UNIXAddress?None?])"."""
    hop, hopPort = nexthop()
    socketPath = tmp_path / "smtp.sock"
    config = (f'hostname = "relay.test"\n[relay]\nsmarthost = "[127.0.0.1]:{hopPort}"\n'
              f'[dns]\nreverse_lookups = false\n[spool]\ndirectory = "spool"\n'
              f'[[listeners]]\nendpoint = "unix:{socketPath}"\n')
    relay = relays(config, defaults=False, listeners=0)
    relay.start()
    relay.waitForLog(r"listening on UNIXAddress")
    home = tmp_path / "home"
    home.mkdir()
    site = Site(relay, hop, home)
    result = site.run([SENDMAIL, "-i", "bob@example.org"], b"Subject: local\n\nbody\n")
    assert result.returncode == 0, result.stderr
    (got,) = site.hop.waitFor(lambda acc: len(acc) >= 1, what="the message")
    assert got.rcptTos == ["bob@example.org"]
    received = fields(got.content, "Received")
    assert received[0].startswith("from relay.test (localhost [127.0.0.1]) by relay.test "), received
    relay.waitForLog(r"connect from 127\.0\.0\.1:0 on unix:\S+ relay=True")


def test_a_relay_started_with_listen_and_spool_alone_is_reached(relays: Any,
                                                                 tmp_path: Path) -> None:
    """A relay started with --listen (here on a port chosen at start) and --spool on the
    command line: no file names its listener, and the command could not reach it.  It
    publishes its listeners in its spool, where --spool DIR finds them, and so does a
    configuration file naming that spool directory (as Postfix's sendmail reaches the
    running system through the queue_directory of its main.cf).  Stopped, it is said not
    to run, the input left unread."""
    r = relays(None, hold=True).start()  # (--listen tcp:0:interface=127.0.0.1 --spool DIR)
    r.published()
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env["HOME"] = str(tmp_path)

    def send(*options: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([SENDMAIL, *options, "-i", "bob@example.org"],
                              input=b"Subject: found\n\nbody\n", capture_output=True,
                              timeout=60, env={**env, **extra}, cwd=tmp_path)

    result = send("--spool", str(r.spool))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "elsewhere.toml"  # (its listener is not the running relay's)
    config.write_text(f'[spool]\ndirectory = "{r.spool}"\n[[listeners]]\n'
                      f'endpoint = "tcp:{freePort()}:interface=127.0.0.1"\n')
    result = send(MAILRELAY_CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    assert len(r.queued()) == 2
    r.stop()
    assert not (r.spool / "listeners.json").exists()
    result = send("--spool", str(r.spool))
    assert result.returncode == 75, result.stderr  # EX_TEMPFAIL
    assert result.stderr.decode() == (
        f"mailrelay-sendmail: no relay runs on the spool directory {r.spool} (no relay "
        f"publishes its listeners in {r.spool / 'listeners.json'}); is mailrelay running? "
        "Nothing was sent; try again later\n")

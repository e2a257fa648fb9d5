"""End-to-end: the hooks of [[plugins]] in the real C{twistd -n mailrelay}, with a site's
plugins (examples/site-hooks) found on PYTHONPATH as docs/plugins.md says: connect, HELO,
MAIL, DATA (greylisting), the message filter, the ESMTP extension, the queue and delivery
observers (in the delivery process), a plugin that is a service (started, reloaded,
stopped in order), a plugin whose build fails, and C{--list-plugins}."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TWISTD, RelayProcess
from tests.test_e2e_reload import _reload
from tests.test_hook_values import dropinsOfOneName

SITE = Path(__file__).resolve().parent.parent / "examples" / "site-hooks"
ENV = {"PYTHONPATH": os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")])}
MESSAGE = "Subject: hooks\r\n\r\nHello from the tests.\r\n"
#: Everything is delivered to the discard backend, soon.
BASE = ('[dns]\nreverse_lookups = false\n'
        '[[routes]]\ndomain = "*"\nbackend = "discard"\n')


def events(path: Path, hook: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in found if hook is None or e["hook"] == hook]


def waitEvents(r: RelayProcess, path: Path, hook: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = events(path, hook)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} {hook} events not logged: {events(path)}\n{r.log()}")


def plugins(log: Path) -> str:
    return (
        '[[plugins]]\nplugin = "site-gate"\nbad_helo = ["evil.test"]\n'
        '[[plugins]]\nplugin = "site-senders"\nreject = ["spam@example.com"]\n'
        f'[[plugins]]\nplugin = "site-grey"\nlog = "{log}"\n'
        '[[plugins]]\nplugin = "site-filter"\nreject_word = "VIRUS"\n'
        '[[plugins]]\nplugin = "site-ext"\n'
        f'[[plugins]]\nplugin = "site-observer"\nlog = "{log}"\n'
    )


def sitePlugins(
    tmp_path: Path, module: str, source: str, dropin: str
) -> tuple[Path, dict[str, str]]:
    """A site's plugin directory in C{tmp_path}: the module C{module} of C{source} and its
    dropin C{dropin}; and the environment putting it on the path (the example's too)."""
    site = tmp_path / "site"
    (site / "twisted" / "plugins").mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (site / "twisted" / "plugins" / f"{module}_plugin.py").write_text(dropin)
    return site, {"PYTHONPATH": os.pathsep.join([str(site), ENV["PYTHONPATH"]])}


def test_every_hook_in_the_real_relay(relays, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    r = relays(BASE + plugins(log), env=ENV).start()
    service = waitEvents(r, log, "service", 1)
    assert service[0]["event"] == "start"

    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        # HELO: a refused name, then a good one; the extension is offered.
        assert s.ehlo("evil.test") == (550, b"5.7.1 Error: HELO evil.test refused")
        code, text = s.ehlo("client.test")
        assert code == 250 and b"XSITE TAG" in text
        # The extension's command sees the connect hook's notes.
        assert s.docmd("XSITE") == (250, b"2.0.0 site says hello to 127.0.0.1")
        # MAIL: the site's sender validator.
        assert s.mail("spam@example.com") == (550, b"5.7.1 Error: sender refused by site policy")
        # DATA: greylisted the first time.
        assert s.mail("alice@example.com", ["XSITE-TAG=Blue"])[0] == 250
        assert s.rcpt("bob@example.org")[0] == 250
        assert s.docmd("DATA") == (451, b"4.7.1 Greylisted, try again later")
        # The second time: the content filter refuses, then passes and tags.
        s.mail("alice@example.com", ["XSITE-TAG=Blue"])
        s.rcpt("bob@example.org")
        assert s.data("Subject: x\r\n\r\nA VIRUS.\r\n") == (
            554, b"5.7.1 Error: message refused by content filter")
        s.mail("alice@example.com", ["XSITE-TAG=Blue"])
        s.rcpt("bob@example.org")
        code, text = s.data(MESSAGE)
    assert code == 250
    queueID = text.decode().rsplit(" ", 1)[1]

    # The queue observer (in the relay) saw the notes of every stage; the delivery observers
    # (in the delivery process) saw the delivery.
    (queued,) = waitEvents(r, log, "queue", 1)
    assert queued["queueID"] == queueID and queued["bounce"] is False
    assert queued["notes"]["senders"] == "checked"
    assert queued["notes"]["filter"]["size"] > len(MESSAGE)
    assert queued["client"] == {"gate": {"connected": "127.0.0.1"}}
    delivered = waitEvents(r, log, "delivery", 2)
    assert {(e["rcpt"], e["outcome"]) for e in delivered} == {("bob@example.org", "delivered")}
    assert all(e["pid"] != queued["pid"] for e in delivered)  # the delivery process
    assert any(e.get("notes", {}).get("filter") for e in delivered)  # the envelope's notes
    r.waitForLog(rf"{queueID}: removed")
    assert r.log().count("NOQUEUE: reject: EHLO from unknown[127.0.0.1]: 550 5.7.1") == 1
    assert "NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 550 5.7.1" in r.log()


def test_the_filter_field_and_notes_are_spooled(relays, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    r = relays(BASE + "[queue]\nhold = true\n" + plugins(log), env=ENV).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@example.com", ["XSITE-TAG=Red"])
        s.rcpt("bob@example.org")
        with pytest.raises(smtplib.SMTPDataError):  # greylisted once
            s.data(MESSAGE)
        s.mail("carol@example.com", ["XSITE-TAG=Red"])
        s.rcpt("bob@example.org")
        code, text = s.data(MESSAGE)
    assert code == 250
    queueID = text.decode().rsplit(" ", 1)[1]
    eml = (r.spool / "queue" / f"{queueID}.eml").read_bytes()
    assert eml.startswith(b"X-Site-Filter: checked ")
    assert b"\r\nReceived: from client.test" in eml
    envelope = json.loads((r.spool / "queue" / f"{queueID}.json").read_text())
    assert envelope["parameters"] == {"XSITE-TAG": "red"}
    assert envelope["notes"]["senders"] == "checked"
    assert envelope["client"]["notes"] == {"gate": {"connected": "127.0.0.1"}}
    assert envelope["messageSize"] == len(eml)


def test_a_client_refused_at_connect(relays, tmp_path: Path) -> None:
    config = BASE + '[[plugins]]\nplugin = "site-gate"\nreject = ["127.0.0.1"]\n'
    r = relays(config, env=ENV).start()
    c = r.connect()
    assert c.readReply() == [b"554 5.7.1 Error: 127.0.0.1 is listed"]
    c.send(b"EHLO x\r\n")
    assert c.readReply() == [b"503 5.5.1 Error: no SMTP service here, send QUIT"]
    c.send(b"QUIT\r\n")
    assert c.readReply() == [b"221 2.0.0 Bye"]
    c.expectClosed()
    r.waitForLog(r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 Error: "
                 r"127\.0\.0\.1 is listed; proto=SMTP")


def test_a_service_plugin_starts_reloads_and_stops_after_the_sessions(relays, tmp_path) -> None:
    """site-grey is a service serving data (in the relay) and delivery (in the delivery
    process): each process starts and stops its own object."""
    log = tmp_path / "events.jsonl"
    grey = f'[[plugins]]\nplugin = "site-grey"\nlog = "{log}"\nname = "%s"\n'
    r = relays(BASE + grey % "first", env=ENV).start()
    assert r.process is not None
    relayPID = r.process.pid

    def relayServices() -> list[tuple[str, str]]:
        return [(e["event"], e["name"]) for e in events(log, "service") if e["pid"] == relayPID]

    waitEvents(r, log, "service", 1)
    open_ = r.connect()
    assert open_.readReply()[0].startswith(b"220 ")

    # A reload: the new object starts now, the old one stops once the sessions begun
    # before the reload have ended.
    line = _reload(r, BASE + grey % "second")
    assert "configuration reloaded" in line
    assert relayServices() == [("start", "first"), ("start", "second")]
    open_.send(b"QUIT\r\n")
    open_.readReply()
    # (The relay's own third event: the delivery processes log theirs in the same file.)
    deadline = time.monotonic() + 20
    while len(relayServices()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relayServices()[2:] == [("stop", "first")], events(log)

    # SIGTERM: stopped after the sessions; every delivery process stopped its own too.
    assert r.stop() in (0, -signal.SIGTERM)
    assert relayServices() == [
        ("start", "first"), ("start", "second"), ("stop", "first"), ("stop", "second"),
    ]
    others: dict[int, list[str]] = {}
    for e in events(log, "service"):
        if e["pid"] != relayPID:
            others.setdefault(e["pid"], []).append(e["event"])
    assert sorted(others.values()) == [["start", "stop"], ["start", "stop"]]


def test_a_plugin_that_fails_to_build_is_one_configuration_error(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path / "relay", BASE + '[[plugins]]\nplugin = "site-broken"\n',
                     env=ENV)
    env = dict(os.environ, **ENV)
    done = subprocess.run(r.command(), cwd=r.directory, env=env, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert lines == [
        f"mailrelay: configuration error: {r.directory / 'mailrelay.toml'}: plugins[0]: "
        "plugin 'site-broken' failed to build: RuntimeError: cannot reach the policy server "
        "at 192.0.2.99"
    ], done.stderr.decode()


def test_two_plugins_of_one_name_are_one_configuration_error(tmp_path: Path) -> None:
    """A second site dropin declaring a plugin under a name already installed (here the
    example's site-gate) stops start-up with one configuration error line, as a plugin that
    fails to build does, also when the relay forks its children (the default): it was a
    traceback, the fork server's preparation listing the plugins outside the handler."""
    other = tmp_path / "other"
    (other / "twisted" / "plugins").mkdir(parents=True)
    (other / "twisted" / "plugins" / "other_plugin.py").write_text(
        "from mailrelay.interfaces import IConnectionPolicy, MailRelayPlugin\n"
        "gate = MailRelayPlugin('site-gate', IConnectionPolicy, 'Another gate', 'other:build')\n"
    )
    r = RelayProcess(tmp_path / "relay", BASE + '[[plugins]]\nplugin = "site-gate"\n',
                     env=ENV)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(other), ENV["PYTHONPATH"]]))
    done = subprocess.run(r.command(), cwd=r.directory, env=env, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    assert lines[0].startswith(
        "mailrelay: configuration error: two installed plugins are named 'site-gate'")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('plugin = "site-gate"\nhooks = ["data"]',
         'plugins[0].hooks: "data": the plugin does not provide IDataPolicy'),
        ('plugin = "site-gate"\nhooks = ["conect"]',
         'plugins[0].hooks[0]: unknown hook "conect" (did you mean "connect"?)'),
        ('plugin = "site-grey"\nlog = "x"\nlogg = 1',
         "plugins[0].logg: unknown key \"logg\" (did you mean \"log\"?)"),
        ('plugin = "no-such"', "plugins[0].plugin: unknown plugin 'no-such'"),
        ('plugin = "site-stamp"',
         "plugins[0].plugin: plugin 'site-stamp' serves none of the hooks of [[plugins]] "
         "(connect, helo, esmtp, mail, rcpt, data, message, queue, delivery): it provides "
         "IHeaderStamper, which a [[header_stampers]] table names"),
    ],
)
def test_bad_plugin_entries_name_file_table_and_key(tmp_path: Path, entry: str, message: str) -> None:
    r = RelayProcess(tmp_path / "relay", BASE + f"[[plugins]]\n{entry}\n", env=ENV)
    env = dict(os.environ, **ENV)
    done = subprocess.run(r.command(), cwd=r.directory, env=env, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert f"{r.directory / 'mailrelay.toml'}: {message}" in done.stderr.decode()


def test_list_plugins_shows_the_site_plugins_and_the_chains(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(BASE + plugins(tmp_path / "events.jsonl"))
    env = dict(os.environ, **ENV)
    done = subprocess.run([TWISTD, "mailrelay", "--config", str(config), "--list-plugins"],
                          cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "site-grey" in out and "IDataPolicy, IDeliveryObserver [hooks: data, delivery]" in out
    lines = {line.split("(")[0].strip(): line for line in out.splitlines() if " (" in line}
    assert "site-gate (plugins[0], timeout 30s)" in lines["connect"]
    assert lines["mail"].endswith("-> site-senders (plugins[1], timeout 30s)")
    assert "site-grey (plugins[2]" in lines["data"] and "site-grey (plugins[2]" in lines["delivery"]
    assert "site-filter" in lines["message"] and "site-ext" in lines["esmtp"]


SLOW_FILTER = '''
from twisted.internet import reactor, task
from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IMessageFilter


@implementer(IMessageFilter)
class Slow:
    def filterMessage(self, context):
        return task.deferLater(reactor, 0.5, lambda: CONTINUE)


def build(options, context):
    return Slow()
'''
SLOW_DROPIN = '''
from mailrelay.interfaces import IMessageFilter, MailRelayPlugin

slow = MailRelayPlugin("slow-filter", IMessageFilter, "Takes half a second", "slowfilter:build")
'''


def test_a_client_gone_before_its_250_is_logged(relays, tmp_path: Path) -> None:
    """A client that closes the connection after its end of data, while the relay is still
    at work on the message (here a filter taking half a second; a slow fsync alike): the
    message is queued and the client never sees the 250, so it will likely send it again.
    The log said "queued", then "disconnect", and nothing of that."""
    _, env = sitePlugins(tmp_path, "slowfilter", SLOW_FILTER, SLOW_DROPIN)
    r = relays(BASE + '[[plugins]]\nplugin = "slow-filter"\n', env=env).start()
    for leaves in (True, False):
        c = r.connect()
        c.readReply()
        c.send(b"EHLO client.test\r\n")
        c.readReply()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [c.readReply()[-1][:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.send(b"Subject: leaving\r\n\r\nbody\r\n.\r\n")
        if leaves:
            c.close()
            line = r.waitForLog(r"(\w+): the client 127\.0\.0\.1 closed the connection before the "
                                r"reply to its message was sent \(250 2\.0\.0 Ok: queued as \w+\): "
                                r"it probably never saw it, and may send it again \(a duplicate\)")
            assert f"{line.group(1)}: from=<a@example.com> nrcpt=1" in r.log()
        else:
            (reply,) = c.readReply()
            assert reply.startswith(b"250 2.0.0 Ok: queued as ")
            c.send(b"QUIT\r\n")
            c.readReply()
            c.close()
            r.waitForLog(rf"{reply.rsplit(b' ', 1)[1].decode()}: from=<a@example.com>")
    assert r.log().count("may send it again") == 1


OBSERVER = '''
from zope.interface import implementer

from mailrelay.interfaces import IDeliveryObserver


@implementer(IDeliveryObserver)
class Watch:
    def deliveryAttempted(self, event):
        pass


def build(options, context):
    return Watch()
'''
OBSERVER_DROPIN = '''
from mailrelay.interfaces import IDeliveryObserver, MailRelayPlugin

watch = MailRelayPlugin("site-watch", IDeliveryObserver, "Watches deliveries", "sitewatch:build")
'''


def test_why_a_delivery_process_refuses_the_configuration_is_logged(relays, tmp_path) -> None:
    """A site's delivery observer edited (and broken) while the relay runs, then a reload:
    the delivery process the reload starts imports the edited module and cannot build the
    plugin.  The relay's log says why, naming the plugin, before it restarts the process:
    "delivery process exited unexpectedly (status 1)" was all it had, the configuration
    error going only to the standard error of a process forked from the fork server."""
    site, env = sitePlugins(tmp_path, "sitewatch", OBSERVER, OBSERVER_DROPIN)
    config = BASE + '[[plugins]]\nplugin = "site-watch"\n'
    r = relays(config, env=env)
    r.start()
    r.waitForLog(r"queue manager started")
    (site / "sitewatch.py").write_text(OBSERVER.replace(
        "    return Watch()", "    raise RuntimeError('cannot open the watch log')"))
    assert "configuration reloaded" in _reload(r, config)
    # The reload's warning says so: the relay's code is the old, its children's the new.
    r.waitForLog(re.escape(f"the processes it starts (the delivery process, the acceptors) "
                           f"import 1 of them anew when they use it ({site / 'sitewatch.py'})"))
    r.waitForLog(r"delivery process exited unexpectedly", timeout=20)
    line = r.waitForLog(r"#error\] delivery process: configuration error: .*").group(0)
    assert ("plugins[0]: plugin 'site-watch' failed to build: RuntimeError: cannot open the "
            "watch log") in line


MEDDLER = '''
from zope.interface import implementer

from mailrelay.envelope import Recipient
from mailrelay.interfaces import IHeaderStamper, StampResult


@implementer(IHeaderStamper)
class Meddler:
    def stamp(self, context):
        context.envelope.recipients.append(Recipient("mallory@elsewhere.example",
                                                     "elsewhere.example"))
        return StampResult()


def build(options, context):
    return Meddler()
'''
MEDDLER_DROPIN = '''
from mailrelay.interfaces import IHeaderStamper, MailRelayPlugin

meddler = MailRelayPlugin("site-meddler", IHeaderStamper, "Adds a recipient", "meddler:build")
'''


def test_a_stamper_adding_a_recipient_is_named_in_the_log(relays, tmp_path: Path) -> None:
    """A site's header stamper that adds a recipient: the client gets 451 4.3.0, nothing is
    queued, and the log's one error line names the stamper (it said "a plugin changed the
    Envelope's recipients")."""
    _, env = sitePlugins(tmp_path, "meddler", MEDDLER, MEDDLER_DROPIN)
    r = relays(BASE + '[[header_stampers]]\nplugin = "default"\n'
               '[[header_stampers]]\nplugin = "site-meddler"\n', env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("alice@example.com")
        s.rcpt("bob@example.org")
        assert s.data(MESSAGE) == (
            451, b"4.3.0 Error: temporary failure processing the message, try again later")
    r.waitForLog(r"from=<alice@example\.com> nrcpt=1 .*result=451 4\.3\.0 ")
    errors = [x for x in r.log().splitlines() if "#error]" in x or "#critical]" in x]
    assert len(errors) == 1, errors
    assert ("header stamper site-meddler changed the Envelope's recipients (only notes may "
            "change); the message is refused with 451") in errors[0]
    assert list((r.spool / "queue").iterdir()) == []


REFUSER = '''
from zope.interface import implementer

from mailrelay.interfaces import IRecipientValidator, Verdict


@implementer(IRecipientValidator)
class Refuser:
    def validateRecipient(self, client, envelope, recipient):
        return Verdict.reject("no\\x00such\\x1b[2Juser\\x7f", 550, "5.1.1")


def build(options, context):
    return Refuser()
'''
REFUSER_DROPIN = '''
from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin

refuser = MailRelayPlugin("site-refuser", IRecipientValidator, "Refuses", "refuser:build")
'''


def test_control_characters_of_a_plugins_reply_are_not_sent(relays, tmp_path: Path) -> None:
    """RFC 5321 4.2: reply text is HT and SP to "~".  A site validator's reply with a NUL,
    an escape sequence and DEL reached the client as given; each is now '?'."""
    _, env = sitePlugins(tmp_path, "refuser", REFUSER, REFUSER_DROPIN)
    r = relays(BASE + '[[plugins]]\nplugin = "site-refuser"\n', env=env).start()
    c = r.connect()
    c.readReply()
    c.send(b"EHLO client.test\r\n")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\n")
    c.readReply()
    c.send(b"RCPT TO:<b@example.org>\r\n")
    assert c.readReply() == [b"550 5.1.1 no?such?[2Juser?"]
    c.send(b"QUIT\r\n")
    c.readReply()
    c.close()


GOAHEAD = '''
from zope.interface import implementer

from mailrelay.interfaces import IESMTPExtension, Reply


@implementer(IESMTPExtension)
class GoAhead:
    keyword = "XGO"
    mailParameters = ()
    rcptParameters = ()
    verbs = ("XGO",)

    def ehloLine(self, client):
        return "XGO"

    def mailParameter(self, client, envelope, name, value):
        raise ValueError("none")

    def rcptParameter(self, client, envelope, recipient, name, value):
        raise ValueError("none")

    def command(self, client, envelope, verb, argument):
        return Reply(354, "", "go ahead")


def build(options, context):
    return GoAhead()
'''
GOAHEAD_DROPIN = '''
from mailrelay.interfaces import IESMTPExtension, MailRelayPlugin

goAhead = MailRelayPlugin("site-goahead", IESMTPExtension, "Answers 354", "goahead:build")
'''


def test_an_extension_answering_354_is_refused(relays, tmp_path: Path) -> None:
    """A site extension's command answering 354: the client was told to send its message,
    whose lines the relay then read as commands.  It is a bad answer: 451 4.3.0, logged
    naming the extension, and the session goes on."""
    _, env = sitePlugins(tmp_path, "goahead", GOAHEAD, GOAHEAD_DROPIN)
    r = relays(BASE + '[[plugins]]\nplugin = "site-goahead"\n', env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        assert s.ehlo("client.test")[0] == 250
        assert s.docmd("XGO") == (451, b"4.3.0 Error: temporary failure, try again later")
        assert s.mail("alice@example.com")[0] == 250
    r.waitForLog(r"#error\] ESMTP extension site-goahead answered XGO from 127\.0\.0\.1 with "
                 r"354 go ahead, not a final reply")


SLOWEHLO = GOAHEAD.replace("class GoAhead", "class SlowEhlo").replace(
    "return GoAhead()", "return SlowEhlo()")
SLOWEHLO = SLOWEHLO.replace(
    '    def ehloLine(self, client):\n        return "XGO"',
    '    def ehloLine(self, client):\n        import time\n        time.sleep(0.05)\n'
    '        return "XGO"')
SLOWEHLO_DROPIN = GOAHEAD_DROPIN.replace("goahead", "slowehlo").replace("goAhead", "slowEhlo")


def test_an_extension_blocking_in_ehloLine_past_its_timeout_is_logged(relays, tmp_path) -> None:
    """A site extension whose ehloLine held the reactor past its timeout: the relay said
    nothing of it.  It is logged once, naming the extension and the call; its line, which
    it did give, is offered."""
    _, env = sitePlugins(tmp_path, "slowehlo", SLOWEHLO, SLOWEHLO_DROPIN)
    r = relays(BASE + '[[plugins]]\nplugin = "site-slowehlo"\ntimeout = 0.01\n',
               env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        assert s.ehlo("client.test")[0] == 250 and s.has_extn("XGO")
    pattern = (r"#warn\] ESMTP extension site-slowehlo held the reactor for 0\.\d+s in ehloLine "
               r"for 127\.0\.0\.1, past its timeout of 0\.01s")
    r.waitForLog(pattern)
    assert len(re.findall(pattern, r.log())) == 1, r.log()


SLOWXGO = GOAHEAD.replace("class GoAhead", "class SlowXgo").replace(
    "return GoAhead()", "return SlowXgo()")
SLOWXGO = SLOWXGO.replace(
    '        return Reply(354, "", "go ahead")',
    '        import time\n        time.sleep(0.3)\n        return Reply(250, "2.0.0", "went")')
SLOWXGO_DROPIN = GOAHEAD_DROPIN.replace("goahead", "slowxgo").replace("goAhead", "slowXgo")


def test_an_extension_command_is_timed_and_its_blocking_logged(relays, tmp_path) -> None:
    """A site extension's command that held the reactor (0.3 s, under its timeout) was
    neither counted in mailrelay_plugin_seconds nor logged, where its ehloLine and parameter
    parsers are: it is, as any hook's call."""
    from tests.test_e2e_operating import metricsPort, value, waitSamples

    _, env = sitePlugins(tmp_path, "slowxgo", SLOWXGO, SLOWXGO_DROPIN)
    r = relays(BASE + '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n'
               '[[plugins]]\nplugin = "site-slowxgo"\n', env=env, listeners=2).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        assert s.ehlo("client.test")[0] == 250
        assert s.docmd("XGO") == (250, b"2.0.0 went")
    r.waitForLog(r"#warn\] esmtp plugin site-slowxgo held the reactor for 0\.\d\ds: every "
                 r"connection of this process waited")
    labels = {"hook": "esmtp", "plugin": "site-slowxgo"}
    samples = waitSamples(metricsPort(r), lambda s: value(  # (its ehloLine, its command)
        s, "mailrelay_plugin_seconds_count", **labels) == 2, "the command's time")
    assert value(samples, "mailrelay_plugin_seconds_sum", **labels) >= 0.3
    assert value(samples, "mailrelay_plugin_seconds_bucket", le="0.25", **labels) == 1


VIA = '''
from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IMessageFilter, IRewritingFilter


@implementer(IMessageFilter, IRewritingFilter)
class Via:
    def filterMessage(self, context):
        return CONTINUE


def build(options, context):
    return Via()
'''
VIA_DROPIN = '''
from mailrelay.interfaces import IMessageFilter, MailRelayPlugin

via = MailRelayPlugin("site-via", IMessageFilter, "Rewrites From:", "via:build")
'''


def test_a_sites_rewriting_filter_after_dkim_sign_stops_the_relay(relays, tmp_path) -> None:
    """A site's filter declaring that it rewrites header fields, after dkim-sign, would
    break every signature: the relay knew only sender-canonical by name and started.  It
    does not start, naming the file and both entries (RFC 6376 5.4)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.test_e2e_dkim import keyFile

    _, env = sitePlugins(tmp_path, "via", VIA, VIA_DROPIN)
    key = keyFile(tmp_path / "ed.pem", ed25519.Ed25519PrivateKey.generate())
    r = relays(BASE + '[[plugins]]\nplugin = "dkim-sign"\n'
               f'keys = [{{domain = "example.com", selector = "s", key_file = "{key}"}}]\n'
               '[[plugins]]\nplugin = "site-via"\n', env=env)
    with pytest.raises(AssertionError, match="relay exited with 1"):
        r.start()
    assert re.search(
        r"mailrelay: configuration error: \S+/mailrelay\.toml: plugins\[1\]: site-via must "
        r"come before dkim-sign \(plugins\[0\]\): site-via rewrites addresses or header "
        r"fields and dkim-sign signs the message", r.log()), r.log()


def test_a_plugin_whose_dropin_fails_to_import_is_explained(tmp_path: Path) -> None:
    """A site dropin that cannot be imported (it needs a module not installed): the relay
    refuses the configuration naming its plugin, and now says which dropin failed and
    why, instead of only "unknown plugin"."""
    site, env = sitePlugins(tmp_path, "acme", "", (
        "from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin\n"
        "import acme_ldap_client_not_installed\n"
        "acme = MailRelayPlugin('acme-ldap', IRecipientValidator, 'LDAP', 'acme:build')\n"))
    r = RelayProcess(tmp_path / "relay", BASE + '[[plugins]]\nplugin = "acme-ldap"\n')
    done = subprocess.run(r.command(), cwd=r.directory, env=dict(os.environ, **env),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert ("plugins[0].plugin: unknown plugin 'acme-ldap'; installed plugins: " in
            done.stderr.decode()), done.stderr.decode()
    assert ("; a dropin failed to import (its plugins are missing): "
            f"{site / 'twisted' / 'plugins' / 'acme_plugin.py'}: ModuleNotFoundError: No module "
            "named 'acme_ldap_client_not_installed'\n") in done.stderr.decode()


SAYS_OK = '''
from twisted.internet.defer import succeed
from zope.interface import implementer

from mailrelay.interfaces import IDeliveryBackend


@implementer(IDeliveryBackend)
class SaysOK:
    def deliver(self, envelope, recipients, route, messagePath):
        return succeed("OK")


def build(options, context):
    return SaysOK()
'''
SAYS_OK_DROPIN = '''
from mailrelay.interfaces import IDeliveryBackend, MailRelayPlugin

saysOK = MailRelayPlugin("site-says-ok", IDeliveryBackend, "Answers OK", "saysok:build")
'''


def test_a_backend_answering_a_string_is_said_so(relays, tmp_path: Path) -> None:
    """A site backend answering "OK" instead of its results: the message stays queued
    (deferred), and the log says what the backend answered -- it said "2 results for 1
    recipients", the letters of "OK" taken for results."""
    _, env = sitePlugins(tmp_path, "saysok", SAYS_OK, SAYS_OK_DROPIN)
    r = relays('[dns]\nreverse_lookups = false\n[[backends]]\nname = "hook"\n'
               'plugin = "site-says-ok"\n[[routes]]\ndomain = "*"\nbackend = "hook"\n',
               env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    r.waitForLog(re.escape("to=<bob@example.org>, relay=hook, ") + r".*status=deferred "
                 + re.escape("(X-mailrelay; delivery via hook:hook gave no usable result ('OK', "
                             "not a list of RecipientResult))"))


SLOW_OBSERVER = '''
import time

from zope.interface import implementer

from mailrelay.interfaces import IQueueObserver


@implementer(IQueueObserver)
class Slow:
    def messageQueued(self, envelope):
        time.sleep(0.4)  # (a write to a slow disk, in the reactor's thread)


def build(options, context):
    return Slow()
'''
SLOW_OBSERVER_DROPIN = '''
from mailrelay.interfaces import IQueueObserver, MailRelayPlugin

slow = MailRelayPlugin("site-slow-observer", IQueueObserver, "Blocks", "slowobserver:build")
'''


def test_a_queue_observer_blocking_the_reactor_is_named(relays, tmp_path: Path) -> None:
    """A site's queue observer that blocks (0.4 s after each commit, every session of the
    relay waiting) is named in the log, as a blocking hook of any other stage is."""
    _, env = sitePlugins(tmp_path, "slowobserver", SLOW_OBSERVER, SLOW_OBSERVER_DROPIN)
    r = relays(BASE + '[[plugins]]\nplugin = "site-slow-observer"\n', env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    r.waitForLog(r"#warn\] queue plugin site-slow-observer held the reactor for 0\.\d\ds: every "
                 r"connection of this process waited")


def test_a_plugin_whose_dropin_is_hidden_by_another_is_explained(tmp_path: Path) -> None:
    """Two sites' plugin directories, each with a dropin named site_plugin.py: Python
    imports the first only, and the relay refused the other's plugin as unknown, without a
    word of why.  It now names the hidden dropin."""
    dropins = dropinsOfOneName(tmp_path, "site_plugin.py", "{}-site")
    r = RelayProcess(tmp_path / "relay", BASE + '[[plugins]]\nplugin = "second-site"\n')
    path = os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second")])
    done = subprocess.run(r.command(), cwd=r.directory, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert ("plugins[0].plugin: unknown plugin 'second-site'; installed plugins: "
            in done.stderr.decode()), done.stderr.decode()
    assert ("; a dropin is hidden by another of its name (its plugins are missing): "
            f"{dropins[1]}, hidden by {dropins[0]}: rename one\n") in done.stderr.decode()


def test_a_dropin_that_fails_to_import_is_one_line_per_process(tmp_path: Path) -> None:
    """A site dropin that fails to import, none of whose plugins is configured: every
    process (the relay, its acceptor, its delivery process) printed Twisted's "Unhandled
    Error" and the traceback at each plugin scan.  Now each process says it once, in one
    line naming the file and the error; the relay runs."""
    site, env = sitePlugins(tmp_path, "acme", "", (
        "from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin\n"
        "import acme_ldap_client_not_installed\n"
        "acme = MailRelayPlugin('acme-ldap', IRecipientValidator, 'LDAP', 'acme:build')\n"))
    r = RelayProcess(tmp_path / "relay", BASE + "[relay]\nprocesses = 2\n", env=env)
    try:
        r.start()
        r.waitForLog(r"acceptor process \d+: accepting on", timeout=20)
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            assert s.sendmail("alice@example.com", ["bob@example.org"], b"Subject: x\r\n\r\nx\r\n") == {}
        r.stop()
        text = r.log()
    finally:
        r.stop()
    dropin = site / "twisted" / "plugins" / "acme_plugin.py"
    # (twistd's own scan for its commands, before any of mailrelay's code runs, still
    # writes one traceback on its standard error, here before the log's first line:
    # Twisted's; it was 10 in all, then 2, the second in the log itself, now debug.)
    started = text.index("twistd ")
    assert text.count("Unhandled Error") <= 1 and "Unhandled Error" not in text[started:], text
    assert "acme_ldap_client_not_installed\n" not in text[started:], text
    lines = [line for line in text.splitlines() if f"plugin dropin {dropin} " in line]
    assert lines, text
    for line in lines:
        assert line.endswith(
            f"plugin dropin {dropin} failed to import, its plugins are not installed: "
            "ModuleNotFoundError: No module named 'acme_ldap_client_not_installed'"), line
    # One line per process at the most (the relay, the acceptor, the delivery process).
    assert len(lines) <= 3, lines

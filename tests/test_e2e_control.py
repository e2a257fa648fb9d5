"""End-to-end: the `mailrelay` command against the real `twistd -n mailrelay`, over its
control socket: the queue commands on real queued mail (a next hop down, then up), in both
queue modes; status, reload and stop; the errors an operator meets; `mailrelay check`."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess, freePort
from tests.test_e2e_operating import nobodyDirectory, nobodyRuntime  # noqa: F401 - a fixture
from tests.test_e2e_outbound import (
    SilentServer,
    nexthop,  # noqa: F401 - the aiosmtpd next-hop fixture
)

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))


def cli(r: RelayProcess | Path, *args: str, prefix: tuple[str, ...] = (),
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `mailrelay --spool <r's spool> ARGS` (after the command C{prefix})."""
    spool = r.spool if isinstance(r, RelayProcess) else r
    return subprocess.run(
        [*prefix, MAILRELAY, "--spool", str(spool), *args], capture_output=True, text=True,
        timeout=timeout,
    )


def ok(r: RelayProcess | Path, *args: str) -> str:
    p = cli(r, *args)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def listing(r: RelayProcess) -> dict[str, dict[str, Any]]:
    """`mailrelay queue list --json`, by queue id."""
    entries = [json.loads(line) for line in ok(r, "queue", "list", "--json").splitlines()]
    return {e["queue_id"]: e for e in entries}


def send(r: RelayProcess, subject: str, sender: str = "alice@example.com",
         to: tuple[str, ...] = ("bob@example.org",)) -> str:
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for address in to:
            s.rcpt(address)
        code, reply = s.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    assert code == 250, reply
    return re.search(rb"queued as (\S+)", reply).group(1).decode()


def waitFor(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen in {timeout}s")


def stored(r: RelayProcess, queueID: str) -> dict[str, Any]:
    return json.loads((r.spool / "queue" / f"{queueID}.json").read_text())


def relayConfig(port: int, extra: str = "") -> str:
    # A first retry an hour away: nothing is retried unless the test flushes it.
    return (f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n'
            f"[queue]\nmin_backoff = 3600\nmax_backoff = 7200\n{extra}")


def deferred(r: RelayProcess, ids: list[str]) -> None:
    """Wait until each of C{ids} had its first attempt refused."""
    waitFor(lambda: all(listing(r).get(i, {}).get("queue_name") == "deferred" for i in ids),
            f"{ids} deferred")


@pytest.mark.parametrize("process", ["separate", "inline"])
def test_queue_commands_on_real_mail(relays, nexthop, process: str) -> None:  # noqa: F811
    """list, show, summary, hold, delete, bounce with the next hop down; then, with it up,
    flush delivers what is not held, a hold survives a restart, release and flush deliver
    the held message."""
    port = freePort()  # nothing listens there yet: every attempt is refused
    r = relays(relayConfig(port, f'process = "{process}"\n')).start()
    held, gone, returned, kept = (send(r, s) for s in ("held", "gone", "returned", "kept"))
    two = send(r, "two", to=("carol@example.net", "dave@example.org"))
    ids = [held, gone, returned, kept, two]
    deferred(r, ids)

    status = ok(r, "status")
    if process == "inline":
        assert "delivery: in the relay's process, queue manager running" in status, status
    else:
        assert re.search(r"delivery: delivery process running \(pid \d+", status), status
    assert "queue: 5 messages, 6 recipients pending (5 deferred)" in status, status

    # queue list: postqueue -p's layout; --json: postqueue -j's fields
    text = ok(r, "queue", "list")
    assert text.startswith("-Queue ID-") and "-- 2 Kbytes in 5 Requests." in text, text
    assert re.search(rf"^{kept} +\d+ \w{{3}} \w{{3}} .* alice@example\.com$", text, re.M), text
    assert "(X-mailrelay; connection refused by 127.0.0.1)" in text
    entries = listing(r)
    assert sorted(entries) == sorted(ids)
    entry = entries[two]
    assert entry["sender"] == "alice@example.com" and entry["attempts"] == 1
    assert [x["address"] for x in entry["recipients"]] == ["carol@example.net",
                                                           "dave@example.org"]
    assert all(x["state"] == "pending" and "refused" in x["delay_reason"]
               for x in entry["recipients"])
    assert entry["message_size"] == (r.spool / "queue" / f"{two}.eml").stat().st_size

    # queue show: envelope and header section (postcat -q)
    shown = ok(r, "queue", "show", kept)
    assert f"*** ENVELOPE RECORDS deferred/{kept} ***" in shown
    assert "sender: alice@example.com" in shown and "helo: client.test" in shown
    assert "Subject: kept" in shown and "body of kept" not in shown
    assert "body of kept" in ok(r, "queue", "show", "--body", kept)

    # queue summary (qshape): messages by destination domain and age
    summary = json.loads(ok(r, "queue", "summary", "--json"))
    rows = {row[0]: row[1:] for row in summary["rows"]}
    assert summary["labels"][:2] == ["T", "5"] and summary["total"][:2] == [5, 5]
    assert rows["example.org"][:2] == [5, 5] and rows["example.net"][:2] == [1, 1]
    assert "example.org" in ok(r, "queue", "summary")

    # hold: stored in the envelope, shown with "!"
    assert f"{held}: placed on hold" in ok(r, "queue", "hold", held)
    assert stored(r, held)["held"] is True
    assert listing(r)[held]["queue_name"] == "hold"
    assert re.search(rf"^{held}!", ok(r, "queue", "list"), re.M)
    again = cli(r, "queue", "hold", held)
    assert again.returncode == 0 and "already on hold" in again.stdout

    # delete: gone, unreported
    assert f"{gone}: deleted" in ok(r, "queue", "delete", gone)
    assert gone not in r.queued()
    r.waitForLog(rf"{gone}: removed by the operator")

    # bounce: returned to the sender now, with a DSN queued in its place
    assert f"{returned}: returned to the sender" in ok(r, "queue", "bounce", returned)
    assert returned not in r.queued()
    r.waitForLog(rf"{returned}: to=<bob@example.org>, relay=none, .*status=bounced")
    dsn = waitFor(lambda: [e for e in listing(r).values() if e["sender"] == ""], "the DSN")[0]
    assert [x["address"] for x in dsn["recipients"]] == ["alice@example.com"]

    # unknown ids: a clear error, exit status 1
    unknown = cli(r, "queue", "hold", "01K1HDPTVQRF0000ZZZZ")
    assert unknown.returncode == 1
    assert "01K1HDPTVQRF0000ZZZZ: no such queue entry" in unknown.stderr
    p = cli(r, "queue", "show", "01K1HDPTVQRF0000ZZZZ")
    assert p.returncode == 1 and "no queue entry 01K1HDPTVQRF0000ZZZZ" in p.stderr
    p = cli(r, "queue", "delete", "not-an-id")
    assert p.returncode == 1 and "not a queue id" in p.stderr

    # The next hop comes up: flush delivers everything not on hold, the DSN included.
    hop, _ = nexthop(port=port)
    out = ok(r, "queue", "flush")
    assert "scheduled for delivery now: 3 messages" in out, out  # not the one on hold
    hop.waitTo("alice@example.com")
    for address in ("bob@example.org", "carol@example.net", "dave@example.org"):
        hop.waitTo(address)
    waitFor(lambda: r.queued() == [held], "only the held message left")
    subjects = [re.search(rb"Subject: (\w+)", m.content).group(1) for m in hop.accepted]
    assert b"held" not in subjects and b"gone" not in subjects and b"returned" not in subjects

    # A hold survives a restart: the held message is not delivered.
    r.stop()
    r.start()
    assert listing(r)[held]["queue_name"] == "hold"
    p = cli(r, "queue", "flush", held)
    assert p.returncode == 0 and "on hold (release it first)" in p.stdout
    time.sleep(1)
    assert r.queued() == [held]

    # release (its next attempt is an hour away), then flush: delivered.
    assert f"{held}: released" in ok(r, "queue", "release", "--all")
    assert "held" not in stored(r, held)
    assert listing(r)[held]["queue_name"] == "deferred"
    assert len(hop.to("bob@example.org")) == 1  # kept's
    ok(r, "queue", "flush", held)
    hop.waitTo("bob@example.org", count=2)
    waitFor(lambda: r.queued() == [], "the queue empty")
    assert "Mail queue is empty" in ok(r, "queue", "list")
    assert "Traceback" not in r.log()


def test_flush_domain_and_delete_all_deferred(relays, nexthop) -> None:  # noqa: F811
    """flush --domain attempts only the messages with a recipient in that domain (postqueue
    -s); delete --all-deferred removes every deferred message but those on hold."""
    port = freePort()
    r = relays(relayConfig(port)).start()
    org = send(r, "org", to=("bob@example.org",))
    net = send(r, "net", to=("carol@example.net",))
    kept = send(r, "kept", to=("dave@example.org",))
    deferred(r, [org, net, kept])
    ok(r, "queue", "hold", kept)
    hop, _ = nexthop(port=port)
    out = ok(r, "queue", "flush", "--domain", "EXAMPLE.NET")
    assert f"{net}: " in out and org not in out, out
    hop.waitTo("carol@example.net")
    waitFor(lambda: net not in r.queued(), "the example.net message delivered")
    assert not hop.to("bob@example.org")

    out = ok(r, "queue", "delete", "--all-deferred")
    assert f"{org}: deleted" in out and kept not in out
    assert r.queued() == [kept]


@pytest.mark.parametrize("command", [("queue", "flush"), ("queue", "flush", "{id}"),
                                     ("queue", "flush", "--domain", "example.org")])
def test_flush_tries_a_suspended_next_hop_again(relays, nexthop, command) -> None:  # noqa: F811
    """A next hop suspended after failures to reach it (see the smtp backend) is tried
    again at a flush, whole, of an entry or of a domain (as Postfix's postqueue -f, -i and
    -s flush its dead destinations): the operator who brought it back up need not wait for
    min_backoff."""
    port = freePort()
    r = relays(relayConfig(port, "[delivery]\ndestination_concurrency = 1\n")).start()
    first = send(r, "first")
    deferred(r, [first])
    second = send(r, "second")
    r.waitForLog(rf"{second}: to=<bob@example.org>, .*delivery temporarily suspended")
    # queue show says the deferral's reason, as the log and the listing do, and the
    # diagnostic beside it (it said the diagnostic as the reason).
    shown = waitFor(lambda: (lambda t: t if "  reason: delivery" in t else None)(
        ok(r, "queue", "show", second)), "the suspension's reason in queue show")
    assert re.search(r"^  reason: delivery temporarily suspended: .*connection refused.*\n"
                     r"  diagnostic: X-mailrelay; connection refused", shown, re.M), shown
    assert "(delivery temporarily suspended: " in ok(r, "queue", "list")
    hop, _ = nexthop(port=port)
    ok(r, *(c.format(id=second) for c in command))
    r.waitForLog(rf"{second}: to=<bob@example.org>, .*status=sent")
    assert any(b"Subject: second" in m.content for m in hop.to("bob@example.org"))


@pytest.mark.parametrize("command", [("queue", "flush"),
                                     ("queue", "flush", "--domain", "example.org")])
def test_a_whole_flush_tries_a_dead_next_hop_once_not_once_per_message(
    relays, command  # noqa: F811
) -> None:
    """A flush of the whole queue or of a domain tries a suspended next hop again once
    (Postfix's postqueue -f and -s: one QMGR_REQ_FLUSH_DEAD), not once per message: the
    first delivery that fails to reach it again suspends it, and the others are deferred
    at once.  It made a connection per message: a dead next hop with 50,000 messages
    deferred got 50,000 connections (each a connect time-out when it drops them)."""
    dead = SilentServer()  # takes each connection and closes it: no greeting
    connections: list[int] = []

    def hangUp(conn: Any) -> None:
        connections.append(1)
        conn.close()

    dead.serve(hangUp)
    try:
        # (One message in delivery at a time: as the 50,000's, most are activated after
        # the first ones failed to reach it.)
        r = relays(relayConfig(dead.port, "active_limit = 1\n"
                                          "[delivery]\ndestination_concurrency = 1\n")).start()
        first = send(r, "first")
        r.waitForLog(rf"{first}: to=<bob@example.org>, .*status=deferred")
        ids = [first, *(send(r, f"more {n}") for n in range(4))]
        for queueID in ids[1:]:
            r.waitForLog(rf"{queueID}: to=<bob@example.org>, .*delivery temporarily suspended")
        assert len(connections) == 1
        ok(r, *command)
        for queueID in ids:
            r.waitForLog(rf"{queueID}: to=<bob@example.org>, .*attempts=2, status=deferred")
        assert len(connections) == 2, r.log()
    finally:
        dead.close()


def test_flush_of_one_message_leaves_other_suspended_next_hops_alone(
    relays, nexthop  # noqa: F811
) -> None:
    """Flushing one message tries its own suspended next hop again, not every suspended
    one (Postfix's postqueue -i unthrottles only the queues the message's recipients go
    to): mail for another next hop still down is deferred at once, as before the flush."""
    port, other = freePort(), freePort()
    route = (f'[[routes]]\ndomain = "example.net"\nbackend = "smtp"\n'
             f'nexthop = "[127.0.0.1]:{other}"\n')
    r = relays(relayConfig(port, "[delivery]\ndestination_concurrency = 1\n" + route)).start()
    org, net = send(r, "org"), send(r, "net", to=("carol@example.net",))
    deferred(r, [org, net])
    hop, _ = nexthop(port=port)
    ok(r, "queue", "flush", org)
    r.waitForLog(rf"{org}: to=<bob@example.org>, .*status=sent")
    later = send(r, "later", to=("dave@example.net",))
    r.waitForLog(rf"{later}: to=<dave@example.net>, .*delivery temporarily suspended")


def test_flushes_do_not_push_the_next_attempt_away(relays) -> None:
    """The next attempt after a failed one is the message's age later, at least min_backoff
    and at most max_backoff, as Postfix's qmgr schedules it: flushing a young message three
    times leaves it min_backoff from its next attempt, not a doubled delay per attempt."""
    port = freePort()  # nothing listens there: every attempt is refused
    r = relays(relayConfig(port).replace("min_backoff = 3600", "min_backoff = 60")
               .replace("max_backoff = 7200", "max_backoff = 4000")).start()
    queueID = send(r, "flushed")
    deferred(r, [queueID])
    for attempts in (2, 3, 4):
        ok(r, "queue", "flush", queueID)
        waitFor(lambda n=attempts: listing(r)[queueID]["attempts"] == n, f"attempt {attempts}")
    entry = listing(r)[queueID]
    age = time.time() - entry["arrival_time"]
    assert entry["next_attempt"] <= time.time() + max(60, age) + 1, (entry, age)
    assert entry["next_attempt"] == stored(r, queueID)["nextAttempt"] // 1


def test_relayed_mail_from_the_null_sender_expires_at_bounce_lifetime(relays) -> None:
    """A message from the null sender relayed for a client (a bounce from elsewhere) is
    given up after bounce_lifetime, as the relay's own bounces are (Postfix applies
    bounce_queue_lifetime to every message with an empty sender); a message with a sender
    keeps max_lifetime."""
    port = freePort()  # nothing listens there: every attempt is refused
    r = relays(relayConfig(port, "max_lifetime = 3600\nbounce_lifetime = 1\n")).start()
    bounce = send(r, "bounce", sender="")
    kept = send(r, "kept")
    deferred(r, [bounce, kept])
    arrival = listing(r)[bounce]["arrival_time"]
    waitFor(lambda: time.time() > arrival + 2, "the bounce older than bounce_lifetime")
    ok(r, "queue", "flush")
    r.waitForLog(rf"{bounce}: to=<bob@example.org>, relay=.*status=bounced \(message "
                 r"expired after \d+s in the queue; last error: ")
    r.waitForLog(rf"{bounce}: undeliverable bounce discarded \(to <bob@example.org>\)")
    waitFor(lambda: listing(r).get(kept, {}).get("attempts") == 2, "the second attempt")
    assert r.queued() == [kept]
    assert listing(r)[kept]["recipients"][0]["state"] == "pending"


def test_hold_all_and_hold_mode(relays) -> None:
    """hold --all, release --all; with [queue] hold = true (no queue manager runs) the queue
    can still be listed, and the commands that would change it say why they cannot."""
    r = relays(relayConfig(freePort())).start()
    ids = [send(r, f"m{i}") for i in range(3)]
    deferred(r, ids)
    out = ok(r, "queue", "hold", "--all")
    assert "placed on hold: 3 messages" in out
    assert {e["queue_name"] for e in listing(r).values()} == {"hold"}
    assert "released from hold: 3 messages" in ok(r, "queue", "release", "--all")
    p = cli(r, "queue", "hold")
    assert p.returncode == 2  # a usage error
    assert p.stderr == "mailrelay: give one or more queue ids, or --all\n"
    r.stop()

    held = relays(relayConfig(freePort(), "hold = true\n"), name="relay").start()
    assert sorted(listing(held)) == sorted(ids)
    p = cli(held, "queue", "hold", ids[0])
    assert p.returncode == 1
    assert "no delivery process runs: [queue] hold = true" in p.stderr, p.stderr
    status = json.loads(ok(held, "status", "--json"))
    assert status["delivery"]["state"] == "off"
    assert status["queue"]["messages"] == 3


def test_status_reload_stop(relays) -> None:
    r = relays(relayConfig(freePort())).start()
    child = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
    text = ok(r, "status")
    assert f"mailrelay is running (pid {r.process.pid}," in text, text
    assert re.search(rf"listeners: tcp:0:interface=127\.0\.0\.1 \(relay\) on "
                     rf"127\.0\.0\.1:{r.port}", text), text
    assert f"delivery process running (pid {child}," in text
    assert "queue manager: running" in text and "queue: 0 messages" in text
    status = json.loads(ok(r, "status", "--json"))
    assert status["pid"] == r.process.pid and status["delivery"]["pid"] == child
    assert status["queue"]["queues"]["deferred"] == 0

    # reload: a bad configuration is refused (exit 1, why), the relay runs on
    path = r.directory / "mailrelay.toml"
    good = path.read_text()
    path.write_text(good + "[limits]\nrecipients = \"ten\"\n")
    p = cli(r, "reload")
    assert p.returncode == 1
    assert "configuration not reloaded (still running on the previous one)" in p.stderr
    assert "limits.recipients" in p.stderr
    # A file the command cannot read either (it finds the spool in it): it says that the
    # running relay keeps its configuration (it said only 'configuration error').
    path.write_text("this is not TOML [")
    p = subprocess.run([MAILRELAY, "--config", str(path), "reload"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "TOML syntax error" in p.stderr, p
    assert p.stderr.rstrip().endswith("nothing was reloaded: a running relay goes on with the "
                                      "configuration it has"), p.stderr
    path.write_text(good.replace("min_backoff = 3600", "min_backoff = 1800"))
    assert f"configuration reloaded from {path}" in ok(r, "reload")
    r.waitForLog("configuration reloaded from")

    # stop: waits until the relay has stopped
    socketPath = r.spool / "control.sock"
    # Open to all (the relay tells its users apart), in a spool searchable by all: any user
    # may list the queue ([spool] mailq_users = "anyone").
    assert stat.S_IMODE(socketPath.stat().st_mode) == 0o666
    assert stat.S_IMODE(r.spool.stat().st_mode) == 0o711
    out = ok(r, "stop")
    assert f"stopping (pid {r.process.pid})" in out and "mailrelay: stopped" in out
    assert r.process.wait(10) == 0
    assert not socketPath.exists()
    p = cli(r, "status")
    assert p.returncode == 1 and "the relay is not running" in p.stderr


def test_status_while_the_relay_stops(relays) -> None:
    """mailrelay status while the relay stops (a message still being received holds it for
    drain_time) says it is stopping and that its listeners are closed: it said "mailrelay
    is running" and each listener "on None"."""
    r = relays("drain_time = 10\n[queue]\nhold = true\n").start()
    client = r.connect()
    try:
        client.readReply()
        for command in (b"EHLO client.test", b"MAIL FROM:<a@example.com>",
                        b"RCPT TO:<b@example.org>", b"DATA"):
            client.send(command + b"\r\n")
            client.readReply()
        client.send(b"Subject: unfinished\r\n\r\n")
        assert "mailrelay: stopping" in ok(r, "stop", "--no-wait")
        r.waitForLog("relay stopping: 1 session")
        text = ok(r, "status")
        assert f"mailrelay is stopping (pid {r.process.pid}," in text, text
        assert "listeners: tcp:0:interface=127.0.0.1 (relay) closed" in text, text
        assert "None" not in text, text
        assert json.loads(ok(r, "status", "--json"))["running"] is False
    finally:
        client.close()
    assert r.process.wait(20) == 0


def test_queue_list_when_the_relay_is_down(relays) -> None:
    """queue list (and mailq) with the relay stopped reads the spool itself and says so,
    as Postfix's postqueue ('Mail system is down -- accessing queue directly'); it refused
    with 'the relay is not running'."""
    r = relays(relayConfig(freePort(), "hold = true\n")).start()
    queued = [send(r, f"s{i}") for i in range(3)]
    assert r.stop() in (0, -signal.SIGTERM)
    p = cli(r, "queue", "list")
    assert p.returncode == 0, p
    assert p.stderr == (f"mailrelay: the relay is not running (no control socket answers at "
                        f"{r.spool}/control.sock); reading the queue in {r.spool} directly\n")
    for queueID in queued:
        assert queueID in p.stdout, p.stdout
    p = cli(r, "--json", "queue", "list")
    assert sorted(json.loads(line)["queue_id"] for line in p.stdout.splitlines()) == sorted(queued)
    assert cli(r, "queue", "hold", queued[0]).returncode == 1  # changes need the relay


def _nobodysRelay(top: Path) -> tuple[Path, Path, RelayProcess]:
    """C{(directory, spool, relay)}: a relay (not started) in a new directory below C{top}
    that the user nobody can reach, its spool there, holding the mail it receives."""
    directory = nobodyDirectory(top)
    spool = directory / "spool"
    config = relayConfig(freePort(), "hold = true\n") + f'[spool]\ndirectory = "{spool}"\n'
    return directory, spool, RelayProcess(directory, config)


def test_any_local_user_may_list_the_queue_but_not_change_it(nobodyRuntime) -> None:  # noqa: F811
    """Postfix lets every local user run mailq (authorized_mailq_users = static:anyone) and
    only root postsuper.  Ours refused every other user: the control socket was 0600 in a
    spool of mode 0700 ("permission denied on the control socket").  Now the user nobody
    lists the queue (mailrelay queue list, sendmail -bp), and is refused, saying why, what
    changes it or the relay; with the relay down it cannot read the queue (private, as
    Postfix's: "mail system is down"), and says so."""
    python, top = nobodyRuntime
    directory, spool, r = _nobodysRelay(top)
    try:
        r.start()
        queued = send(r, "listed")

        def asNobody(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(python), "-m", *args], user="nobody", group="nogroup",
                                  cwd=directory, capture_output=True, text=True, timeout=60)

        for command in (("mailrelay", "--spool", str(spool), "queue", "list"),
                        ("mailrelay.app.sendmail", "-bp", "-C", str(directory / "mailrelay.toml"))):
            p = asNobody(*command)
            assert p.returncode == 0 and queued in p.stdout, (command, p)
        for args, name in ((("queue", "flush"), "queue-flush"),
                           (("queue", "delete", queued), "queue-delete"),
                           (("queue", "hold", queued), "queue-hold"),
                           (("queue", "show", queued), "queue-show"),
                           (("status",), "status"), (("stop",), "stop")):
            p = asNobody("mailrelay", "--spool", str(spool), *args)
            assert (p.returncode, p.stderr) == (1, (
                f"mailrelay: permission denied: {name} is for root and the relay's user; "
                "other users may only list the queue\n")), (args, p)
        assert list(listing(r)) == [queued]  # (as root: untouched)
        assert r.stop() in (0, -signal.SIGTERM)
        p = asNobody("mailrelay", "--spool", str(spool), "queue", "list")
        assert p.returncode == 1, p
        assert p.stderr.endswith(
            f"mailrelay: listing {spool}/queue failed: Permission denied (EACCES)\n"), p.stderr
    finally:
        r.stop()


#: Run by the user nobody: opens a connection to the control socket (argv[1]) more than the
#: relay keeps of other users' (argv[2]), then sends a request that never ends on the
#: first; prints what became of the last connection and of the first.
_HOGGING = """
import socket, struct, sys
socks = []
for _ in range(int(sys.argv[2]) + 1):
    socks.append(socket.socket(socket.AF_UNIX))
    socks[-1].settimeout(20)
    socks[-1].connect(sys.argv[1])
print("closed" if socks[-1].recv(1) == b"" else "answered")
chunk = b"".join(struct.pack("!H", len(k)) + k + struct.pack("!H", 1000) + b"v" * 1000
                 for k in (b"k%d" % i for i in range(64)))
try:
    for _ in range(100):
        socks[0].sendall(chunk)
    print("closed" if socks[0].recv(1) == b"" else "answered")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
except TimeoutError:
    print("open")
"""


def test_another_user_cannot_hold_the_control_socket(nobodyRuntime) -> None:  # noqa: F811
    """The socket is open to every local user: one of them may not take the relay's file
    descriptors (connections held open) nor its memory (a request that never ends): past
    MAX_OTHER_CONNECTIONS of theirs, or MAX_OTHER_REQUEST octets, the relay closes the
    connection and says so, and serves root still."""
    from mailrelay.app.control import MAX_OTHER_CONNECTIONS

    python, top = nobodyRuntime
    directory, spool, r = _nobodysRelay(top)
    try:
        r.start()
        queued = send(r, "listed")
        p = subprocess.run([str(python), "-c", _HOGGING, str(spool / "control.sock"),
                            str(MAX_OTHER_CONNECTIONS)], user="nobody", group="nogroup",
                           cwd=directory, capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout) == (0, "closed\nclosed\n"), p
        r.waitForLog(r"control socket: connection from process \d+ of user 65534 closed: too "
                     r"many connections of users other than root and the relay's \(16\)")
        r.waitForLog(r"control socket: connection of a user other than root and the relay's "
                     r"closed: a request longer than 65536 octets")
        assert list(listing(r)) == [queued]  # (as root: served)
    finally:
        r.stop()


#: Run by the user nobody: one connection to the control socket (argv[1]); for each line
#: read, a queue listing asked on it, and what the relay answered printed (its error code,
#: or "listed").
_LISTING_ON_ONE_CONNECTION = """
import sys
from twisted.protocols import amp
s = __import__("socket").socket(__import__("socket").AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
for n, _ in enumerate(sys.stdin, 1):
    s.sendall(amp.AmpBox(_command=b"queue-list", _ask=b"%d" % n, limit=b"10").serialize())
    data = b""
    while not data.endswith(b"\\x00\\x00"):
        data += s.recv(65536)
    box = amp.parseString(data)[0]
    print(box.get(b"_error_code", b"listed").decode(), flush=True)
"""


def test_a_user_taken_out_of_mailq_users_by_a_reload_may_not_list_on_its_connection(
    nobodyRuntime,  # noqa: F811
) -> None:
    """Postfix's showq checks authorized_mailq_users at each request; a user removed from
    [spool] mailq_users by a reload went on listing the queue on the connection it had
    opened before."""
    python, top = nobodyRuntime
    directory, spool, r = _nobodysRelay(top)
    r.configText += 'mailq_users = ["nobody"]\n'
    lister = None
    try:
        r.start()
        lister = subprocess.Popen(
            [str(python), "-c", _LISTING_ON_ONE_CONNECTION, str(spool / "control.sock")],
            user="nobody", group="nogroup", cwd=directory, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert lister.stdin is not None and lister.stdout is not None

        def listOnce() -> str:
            lister.stdin.write("\n")
            lister.stdin.flush()
            return lister.stdout.readline().strip()

        assert listOnce() == "listed"
        (directory / "mailrelay.toml").write_text(
            r.configText.replace('mailq_users = ["nobody"]', "mailq_users = []"))
        assert "configuration reloaded" in ok(r, "reload")
        assert listOnce() == "NOT_PERMITTED"
        r.waitForLog(r"control socket: request of process \d+ of user 65534 refused: the "
                     r"user is not in \[spool\] mailq_users \(any more\)")
    finally:
        if lister is not None:
            lister.kill()
            lister.wait(10)
        r.stop()

def test_operator_errors(relays, tmp_path: Path) -> None:
    """Not running; a socket the user may not use; a second relay on the same spool."""
    p = cli(tmp_path / "nospool", "queue", "list")
    assert p.returncode == 1
    assert p.stderr.startswith("mailrelay: the relay is not running (no control socket")

    r = relays(relayConfig(freePort())).start()
    sock = r.spool / "control.sock"
    if os.geteuid() == 0:
        # Root may use any file: the socket is given to nobody (made 0600), and the command
        # runs without the capabilities that bypass file permissions.
        os.chown(sock, 65534, 65534)
        sock.chmod(0o600)  # (as on a system that cannot tell the socket's users apart)
        drop = "-dac_override,-dac_read_search"
        p = cli(r, "queue", "list",
                prefix=("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"))
        os.chown(sock, 0, 0)
        sock.chmod(0o666)
    else:
        sock.chmod(0)
        p = cli(r, "queue", "list")
        sock.chmod(0o666)
    assert p.returncode == 1, p
    assert p.stderr == (f"mailrelay: permission denied on the control socket {sock}: run this "
                        "as the user the relay runs as, or as root (to list the queue: as a "
                        "user of its [spool] mailq_users)\n")

    second = RelayProcess(r.directory, r.configText)
    try:
        with pytest.raises(AssertionError, match="another relay is running on this spool"):
            second.start()
    finally:
        second.stop(signal.SIGKILL)
    assert "mailrelay is running" in ok(r, "status")


def test_spool_directory_changed_in_the_file_while_the_relay_runs(relays) -> None:
    """The file's spool.directory edited while the relay runs (a change takes a restart):
    mailrelay --config FILE reload, status and stop find no relay on the new spool.  They
    said only 'the relay is not running' while it ran; they now say that a relay started
    with the file before the change (its process named) is on its old spool and how to
    reach it, which stops it; once it is stopped, only that no relay runs."""
    args = ("--listen", "tcp:0:interface=127.0.0.1", "--hostname", "relay.test")
    r = relays(relayConfig(freePort(), '[spool]\ndirectory = "spool"\n'), args=args,
               defaults=False).start()
    path = r.directory / "mailrelay.toml"
    path.write_text(path.read_text().replace('directory = "spool"', 'directory = "spool-new"'))
    for command in ("reload", "status", "stop"):
        p = subprocess.run([MAILRELAY, "--config", str(path), command], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 1, p
        assert p.stderr == (
            f"mailrelay: no relay runs on {r.directory}/spool-new: it does not exist; a relay "
            f"started with {path} runs (process {r.process.pid}): started before "
            f"spool.directory in {path} was changed, it runs on its old spool until it is "
            "restarted: name that one with --spool (mailrelay --spool OLD-SPOOL stop)\n"
        ), p.stderr
    assert r.process.poll() is None
    assert "mailrelay: stopped" in ok(r, "stop")
    assert r.process.wait(10) == 0
    p = subprocess.run([MAILRELAY, "--config", str(path), "status"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and p.stderr == (
        f"mailrelay: no relay runs on {r.directory}/spool-new: it does not exist\n"), p.stderr


def test_a_relay_that_does_not_answer_and_bad_timeouts(tmp_path: Path) -> None:
    """A control socket that takes the connection and never answers: the command says so
    after --timeout (it printed 'mailrelay: ' and nothing more); a timeout that is not a
    positive number is a usage error (a negative one printed a traceback and hung)."""
    import socket

    spool = tmp_path / "spool"
    spool.mkdir()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(spool / "control.sock"))
    silent.listen(5)
    try:
        for command in ("status", "stop"):
            p = cli(spool, "--timeout", "1", command, timeout=30)
            assert (p.returncode, p.stderr) == (
                1, "mailrelay: the relay did not answer within 1s\n"), p
        for bad in ("-5", "0", "nan", "inf"):
            p = cli(spool, "--timeout", bad, "status", timeout=30)
            assert p.returncode == 2 and "--timeout" in p.stderr, p
            assert "Traceback" not in p.stderr, p
    finally:
        silent.close()


def test_requests_the_relay_refuses_are_usage_errors(relays) -> None:
    """A command the relay refuses as asked wrong (no ids, ids and --all, an unknown queue
    name) exits 2, a usage error, as the README says (it exited 1, as a failure)."""
    r = relays(relayConfig(freePort())).start()
    for args, said in [
        (("queue", "hold"), "give one or more queue ids, or --all"),
        (("queue", "delete"), "give one or more queue ids"),
        (("queue", "hold", "--all", "01K1JC8ZEH9K00000001"), "not both"),
        (("queue", "summary", "--state", "bogus"), "bogus"),
    ]:
        p = cli(r, *args)
        assert p.returncode == 2 and said in p.stderr, (args, p)
        assert p.stderr.startswith("mailrelay: ") and p.stderr.count("\n") == 1, p


def test_many_queue_ids_in_one_command(relays) -> None:
    """Thousands of ids at once (xargs, a script): each gets its result.  Over ~2,900 the
    request did not fit one control message and the command printed 'mailrelay: '."""
    r = relays(relayConfig(freePort())).start()
    ids = [f"01K1JC8ZEH9K{n:08d}" for n in range(5000)]
    p = cli(r, "--json", "queue", "hold", *ids, timeout=120)
    assert p.returncode == 1, p.stderr  # (none of them is queued)
    results = json.loads(p.stdout)["results"]
    assert [item["queue_id"] for item in results] == ids
    assert not any(item["ok"] for item in results)


def test_an_id_given_twice_is_taken_once(relays) -> None:
    """As postsuper -d X -d X ("Deleted: 1 message"): the same id twice in one command, or
    in two of the control messages a long list of ids is sent in, is taken once.  The command
    exited 1 ("another command on X is in progress") after doing the work, with no results."""
    r = relays(relayConfig(freePort())).start()
    a, b, c = (send(r, s) for s in ("a", "b", "c"))
    deferred(r, [a, b, c])
    p = cli(r, "queue", "hold", a, a, b)
    assert (p.returncode, p.stderr) == (0, ""), p
    assert p.stdout == (f"{a}: placed on hold\n{b}: placed on hold\n"
                        "mailrelay: placed on hold: 2 messages\n")
    p = cli(r, "queue", "delete", a, b, a)
    assert (p.returncode, p.stderr) == (0, ""), p
    assert p.stdout == f"{a}: deleted\n{b}: deleted\nmailrelay: deleted: 2 messages\n"
    p = cli(r, "queue", "delete", *[c] * 1001)
    assert (p.returncode, p.stderr, p.stdout) == (0, "", f"{c}: deleted\n"
                                                  "mailrelay: deleted: 1 message\n"), p
    assert r.queued() == []


def test_python_m_mailrelay(relays) -> None:
    r = relays(relayConfig(freePort())).start()
    p = subprocess.run([sys.executable, "-m", "mailrelay", "--spool", str(r.spool), "status"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "mailrelay is running" in p.stdout


def test_check(tmp_path: Path) -> None:
    """mailrelay check builds everything (plugins, certificates...): exit 0 or 1 with the
    error; -n prints the effective configuration, which loads to the same one."""
    config = tmp_path / "relay.toml"
    config.write_text('hostname = "relay.test"\n[spool]\ndirectory = "spool"\n'
                      '[queue]\nmax_lifetime = 3600\n[[recipient_validators]]\n'
                      'plugin = "regex"\nrules = [{pattern = "^x", action = "reject"}]\n')
    p = subprocess.run([MAILRELAY, "check", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "ok" in p.stdout, p
    p = subprocess.run([MAILRELAY, "check", "-n", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p
    effective = tomllib.loads(p.stdout)
    assert effective["hostname"] == "relay.test" and effective["queue"]["max_lifetime"] == 3600
    assert effective["recipient_validators"] == [
        {"plugin": "regex", "rules": [{"pattern": "^x", "action": "reject"}]}]
    assert "# min_backoff = 300.0  (default)" in p.stdout
    assert "# bounce_lifetime: not set (default: 432000, or max_lifetime if smaller)" in p.stdout
    assert "bounce_lifetime" not in p.stderr, p  # its default: no warning

    # bounce_lifetime larger than max_lifetime: max_lifetime is used, with a warning (as
    # Postfix's qmgr adjusts bounce_queue_lifetime).
    config.write_text('[spool]\ndirectory = "spool"\n'
                      '[queue]\nmax_lifetime = 3600\nbounce_lifetime = 7200\n')
    p = subprocess.run([MAILRELAY, "check", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p
    assert (f"mailrelay: warning: {config}: queue.bounce_lifetime (7200) is larger than "
            "queue.max_lifetime (3600): mail from the null sender expires after "
            "max_lifetime") in p.stderr, p

    config.write_text('[[recipient_validators]]\nplugin = "no-such-plugin"\n')
    p = subprocess.run([MAILRELAY, "check", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert "recipient_validators[0]" in p.stderr and "unknown plugin 'no-such-plugin'" in p.stderr

    p = subprocess.run([MAILRELAY, "check", "--json", "--spool", str(tmp_path / ("d" * 120))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "a UNIX socket's path may be: use a shorter spool directory" in json.loads(
        p.stdout)["error"]


#: What the relay (at its start and reloads) and mailrelay check say of postmaster mail
#: with no [queue] postmaster and nothing routing the host name but its MX lookup.
POSTMASTER_REFUSED = (
    "queue.postmaster is not set and nothing routes relay.test but its MX lookup (normally "
    "this relay: a loop): mail to postmaster@relay.test (and <postmaster>) is refused "
    "(550 5.1.1), and bounces that cannot be returned are logged and dropped; set "
    "[queue] postmaster to a mailbox elsewhere, or route relay.test ([[routes]], a "
    "smarthost)")


def test_postmaster_mail_with_nowhere_to_go_is_refused_and_said(relays, tmp_path: Path) -> None:
    """The default configuration has no [queue] postmaster and routes the relay's own host
    name by its MX, normally the relay itself: mail to postmaster@<hostname>, accepted from
    anyone, bounced as a loop (5.4.6: to the sender, or from <> dropped), and nothing said
    so.  It is refused at RCPT now, and the start-up log and mailrelay check say why."""
    text = "[dns]\nreverse_lookups = false\n"
    r = relays(text, hold=True).start()  # (--hostname relay.test)
    assert re.search(r"\[mailrelay\.app\.relay#warn\] \S+/mailrelay\.toml: "
                     + re.escape(POSTMASTER_REFUSED), r.log()), r.log()
    for sender in ("alice@example.com", ""):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.mail(sender)[0] == 250
            for rcpt in ("postmaster@relay.test", "postmaster"):
                assert s.rcpt(rcpt) == (550, b"5.1.1 Recipient address rejected: this relay "
                                             b"has no mailbox for its postmaster"), rcpt
    assert r.queued() == []
    config = tmp_path / "check.toml"
    config.write_text(f'hostname = "relay.test"\n{text}[spool]\ndirectory = "spool"\n')
    p = subprocess.run([MAILRELAY, "check", "--config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p
    assert f"mailrelay: warning: {config}: {POSTMASTER_REFUSED}\n" in p.stderr, p.stderr

def test_status_and_reload_name_a_relative_configuration_absolutely(relays) -> None:
    """twistd started with C{--config relay.toml}: C{mailrelay status} and C{reload} name
    the file the relay reads, resolved against its working directory (they named it
    C{relay.toml}, which says nothing to an operator elsewhere)."""
    r = relays(None, args=("--config", "relay.toml"))
    path = r.directory / "relay.toml"
    path.write_text(relayConfig(freePort()))
    r.start()
    assert f"configuration: {path}\n" in ok(r, "status")
    assert json.loads(ok(r, "status", "--json"))["config"] == str(path)
    assert ok(r, "reload") == f"mailrelay: configuration reloaded from {path}\n"
    assert f"configuration: {path}\n" in ok(r, "status")


def test_show_names_the_server_that_deferred_a_recipient(relays, nexthop) -> None:  # noqa: F811
    """queue show says which server gave a recipient's last status: its Remote-MTA and the
    address it answered from, as the notices name it (name[address])."""
    port = freePort()
    hop, _ = nexthop(port=port)
    hop.rcptReply = lambda address: "450 4.2.1 busy"
    r = relays(relayConfig(port)).start()
    queued = send(r, "busy")
    r.waitForLog(rf"{queued}: to=<bob@example.org>, .*status=deferred")
    shown = ok(r, "queue", "show", queued)
    assert re.search(r"^  remote_mta: dns; \[127\.0\.0\.1\]\n  remote_address: 127\.0\.0\.1$",
                     shown, re.M), shown

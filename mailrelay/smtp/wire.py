"""The SMTP wire format, pure: reply parsing (L{ReplyParser}), dot-stuffing
(L{DotStuffer}), BDAT chunks (L{BDATFramer}, L{LineEndChecker}), diagnostics
(L{replyDiagnostic}, L{statusOf}), EHLO keywords (L{parseExtensions}, L{asciiName}), the
DSN ORCPT parameter (L{orcptValue}), and L{setNoDelay}, which the Twisted adapters of both
sides call on their transport (it only looks for a C{setTcpNoDelay} method, so it needs no
I/O library here), L{describeTLS}, their words for a TLS connection (asked of its object, so
it needs no TLS library either), L{writeNow}, how both write a reply or command (Twisted's
TCP transports named, not imported), and L{formatDate}, the RFC 5322 date of C{Date:},
C{Received:} and the DSN fields."""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from mailrelay.address import utf8AddrDecode, utf8AddrXtext, xtextEncode
from mailrelay.envelope import Recipient
from mailrelay.interfaces import DeliveryStatus
from mailrelay.smtp.errors import BareNewlineError, ProtocolError, SizeMismatchError
from mailrelay.smtp.replies import Reply

#: The last second formatted by L{formatDate}, and its text.
_lastDate: tuple[int, str] = (-1, "")


def formatDate(when: float) -> str:
    """C{when} (seconds since the epoch) as an RFC 5322 date in the local time zone.  The
    date has no part finer than a second: the text of the last second is kept (every
    message's C{Date:} and C{Received:} in the same second share it)."""
    global _lastDate
    second = int(when // 1)
    last, text = _lastDate
    if second != last:
        text = format_datetime(datetime.fromtimestamp(second).astimezone())
        _lastDate = (second, text)
    return text


#: A reply line longer than this (no line end within it) is cut to this many octets.
MAX_REPLY_LINE = 65536
#: A multi-line reply keeps this many lines, the first; the others are read and dropped.
MAX_REPLY_LINES = 1000
#: Diagnostics are cut to this many characters.
MAX_DIAGNOSTIC = 1000

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)


class ReplyParser:
    """Parses server replies strictly.

    Every line is C{code SP text CRLF} or C{code "-" text CRLF} (text may be empty); the last
    has no C{"-"}.  All the lines of one reply should carry the same code (RFC 5321 4.2.1);
    where they do not, the last line's is the reply's, as in Postfix's C{smtp_chat_resp} (a
    protocol error would make a server's C{250-}/C{251} answer to the end of data a deferral,
    and the message be sent again).  A line may end in a bare LF, and the CRs before its
    line end are dropped, as Postfix's C{smtp_get} reads replies (C{smtp_stream.c}: "liberal
    in what we accept"; a deferral would send a message the server has again).  A line
    longer than L{MAX_REPLY_LINE} octets is cut (the rest of it read and dropped), a reply of
    more than L{MAX_REPLY_LINES} lines keeps its first ones, as Postfix's C{smtp_chat_resp}
    cuts a reply (so memory stays bounded, whatever the server sends).  A CR within a line
    raises L{ProtocolError}.  Replies are returned
    as L{Reply}: the enhanced status code (RFC 2034), when the first line starts with one of
    the reply's class, is taken out of every line.

    @ivar cut: what was cut of the reply L{next} returned last, in words for the log
        (C{"a line longer than 65536 octets"}, C{"more than 1000 lines"}, or both), or
        C{None}: it was kept whole.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[bytes] = []
        #: The line buffered was cut: the rest of it, to its line end, is dropped.
        self._cut = False
        #: The reply being read had a line cut, lines dropped.
        self._lineCut = self._linesDropped = False
        self.cut: str | None = None

    @property
    def hasData(self) -> bool:
        """C{True} when bytes are buffered that are not part of a reply returned yet."""
        return bool(self._buf or self._lines)

    def feed(self, data: bytes) -> None:
        if self._cut:
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end:]
            self._cut = False
        self._buf += data

    def next(self) -> Reply | None:
        """The next complete reply, or C{None} until more bytes arrive.

        @raise ProtocolError: malformed input.
        """
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    self._buf = self._buf[:MAX_REPLY_LINE]
                    self._cut = self._lineCut = True
                    _replyLine(self._buf.rstrip(b"\r"))  # (a reply line so far?)
                return None
            line, self._buf = self._buf[:end].rstrip(b"\r"), self._buf[end + 1 :]
            if len(line) > MAX_REPLY_LINE:  # (its line end came in the same piece)
                line, self._lineCut = line[:MAX_REPLY_LINE], True
            code, sep, text = _replyLine(line)
            if len(self._lines) < MAX_REPLY_LINES:
                self._lines.append(text)
            else:
                self._linesDropped = True
            if sep == b"-":
                continue
            lines, self._lines = self._lines, []
            self.cut = ", ".join(
                what for what, done in (
                    (f"a line longer than {MAX_REPLY_LINE} octets", self._lineCut),
                    (f"more than {MAX_REPLY_LINES} lines", self._linesDropped)) if done) or None
            self._lineCut = self._linesDropped = False
            # (Its last line's code, whatever the others said: see the class's docstring.)
            return _makeReply(int(code), [t.decode("utf-8", "replace") for t in lines])


def _replyLine(line: bytes) -> tuple[bytes, bytes, bytes]:
    """The code, separator and text of a reply line (without its line end).
    @raise ProtocolError: it is not one."""
    match = _REPLY_LINE.fullmatch(line)
    if match is None or (not match.group(2) and match.group(3)):
        raise ProtocolError(f"malformed reply line {_show(line)}")
    code, sep, text = match.groups()
    if b"\r" in text:
        raise ProtocolError(f"bare CR in reply line {_show(line)}")
    return code, sep, text


def _makeReply(code: int, lines: list[str]) -> Reply:
    enhanced = ""
    match = _ENHANCED.match(lines[0])
    if match and match.group(1) == str(code)[0]:
        enhanced = match.group(0)
        lines = [line[len(enhanced):].lstrip(" ") if line.startswith(enhanced) else line
                 for line in lines]
    return Reply(code, enhanced, "\n".join(lines))


def _show(data: bytes) -> str:
    text = repr(data[:80])[1:]
    return text + ("..." if len(data) > 80 else "")


#: Where a dot starts a line (after CRLF, or after any LF), searched with C{re}: its search
#: for a literal prefix (a tight C loop over the octets for the first one) is two to four
#: times faster than C{bytes.find} or C{bytes.replace} (which search as C{find} does) for
#: needles this short.
#: Most chunks have no such line: one search and no copy.
_CRLF_DOT = re.compile(rb"\r\n\.")
_LF_DOT = re.compile(rb"\n\.")


class DotStuffer:
    """Turns message content, fed in chunks of any size, into DATA wire format.

    A C{"."} starting any line is doubled (RFC 5321 4.5.2), also when the line starts exactly at
    a chunk boundary or the chunk boundary falls between its CR and LF.  L{finish} returns the
    terminator: C{".\\r\\n"} after content ending in CRLF (and for empty content), else
    C{"\\r\\n.\\r\\n"}.  Each call is a few C{bytes} methods over the whole chunk, never a loop
    over lines.

    With C{checkLineEnds} (the default: content from anywhere), a bare CR or LF raises
    L{BareNewlineError}, and a trailing CR is held back until the next chunk shows whether an
    LF follows.  Without (content whose line ends were checked already, as the spool's text
    messages, see L{mailrelay.delivery.connection.SMTPConnection.send}), a chunk costs one
    search (L{_LF_DOT}; a C{bytes.replace} only when a line is to be stuffed) and nothing is
    held back; the dot after I{any} LF is doubled, so that even a damaged file holding a bare
    LF cannot end the data early at a next hop that takes a bare LF for a line end (SMTP
    smuggling).  For content with CRLF line ends only, both ways give the same bytes.
    """

    def __init__(self, checkLineEnds: bool = True) -> None:
        self.checkLineEnds = checkLineEnds
        self._atLineStart = True
        self._carry = b""
        # Unchecked: the last two octets of the content so far (for the terminator), and
        # whether the last was an LF (for a dot starting the next chunk).
        self._tail = b"\r\n"
        self._afterLF = True

    def feed(self, chunk: bytes) -> bytes:
        """Stuff one chunk.  @raise BareNewlineError: a bare CR or LF (when checking)."""
        if not self.checkLineEnds:
            return self._feedUnchecked(chunk)
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if chunk.endswith(b"\r"):
            self._carry = b"\r"
            chunk = chunk[:-1]
        if not chunk:
            return b""
        lf = chunk.count(b"\n")
        if chunk.count(b"\r") != lf or chunk.count(b"\r\n") != lf:
            raise BareNewlineError()
        if self._atLineStart and chunk.startswith(b"."):
            chunk = b"." + chunk
        if _CRLF_DOT.search(chunk) is not None:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._atLineStart = chunk.endswith(b"\r\n")
        return chunk

    def _feedUnchecked(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._afterLF and chunk[0] == 0x2E:  # "." starting a line at the chunk's start
            chunk = b"." + chunk
        if _LF_DOT.search(chunk) is not None:
            chunk = chunk.replace(b"\n.", b"\n..")
        self._afterLF = chunk[-1] == 0x0A
        self._tail = chunk[-2:] if len(chunk) > 1 else self._tail[-1:] + chunk
        return chunk

    def finish(self) -> bytes:
        """The end-of-data marker.  @raise BareNewlineError: the content ended in a bare CR
        (when checking)."""
        if not self.checkLineEnds:
            return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"
        if self._carry:
            raise BareNewlineError()
        return b".\r\n" if self._atLineStart else b"\r\n.\r\n"


def describeTLS(connection: Any) -> str | None:
    """The TLS version and cipher of an established C{OpenSSL.SSL.Connection}, as
    C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}, or C{None} when C{connection} is not one."""
    try:
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
    except Exception:  # not a connection (AttributeError), or OpenSSL's error
        return None
    if not version or not cipher:
        return None
    return f"{version} {cipher}"


class LineEndChecker:
    """Checks message content, fed in chunks of any size, for a bare CR or LF (what
    L{DotStuffer} refuses), without changing it: for BDAT, which sends content as it is."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: bytes) -> None:
        """Check one chunk.  @raise BareNewlineError: a bare CR or LF."""
        if not chunk:
            return
        if self._cr:
            if not chunk.startswith(b"\n"):
                raise BareNewlineError()
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        lf = chunk.count(b"\n")
        if chunk.count(b"\r") != lf or chunk.count(b"\r\n") != lf:
            raise BareNewlineError()

    def finish(self) -> None:
        """The content ended.  @raise BareNewlineError: it ended in a bare CR."""
        if self._cr:
            raise BareNewlineError()


class BDATFramer:
    """Turns message content of a known C{size}, fed in chunks, into BDAT commands and their
    data (RFC 3030): no dot-stuffing, no terminator; the last chunk's command says C{LAST}.

    With C{pipelined} (the server offers PIPELINING), each chunk fed becomes one command,
    C{BDAT <length>}, written with its data at once, and the commands follow each other
    without waiting for replies.  Without, the whole content is one chunk, C{BDAT <size>
    LAST}, its command written before the first data: one reply, after all of it.

    C{feed} and C{finish} return the bytes to write and, for each chunk those bytes complete,
    whether it was the last (the server answers each chunk once it has it all).  Content of
    no octets is C{BDAT 0 LAST}.  With C{checkLineEnds} (all but BINARYMIME content), a bare
    CR or LF raises L{BareNewlineError}, as L{DotStuffer} does.
    """

    def __init__(self, size: int, *, pipelined: bool, checkLineEnds: bool = True) -> None:
        if size < 0:
            raise ValueError(f"bad size {size}")
        self.size = size
        self.pipelined = pipelined
        self.sent = 0
        self._checker = LineEndChecker() if checkLineEnds else None
        self._started = False

    def feed(self, chunk: bytes) -> tuple[bytes, list[bool]]:
        """Frame one chunk.  @raise SizeMismatchError: more content than C{size}.
        @raise BareNewlineError: see the class docstring."""
        if not chunk:
            return b"", []
        if self.sent + len(chunk) > self.size:
            raise SizeMismatchError(f"more than the {self.size} octets announced")
        if self._checker is not None:
            self._checker.feed(chunk)
        self.sent += len(chunk)
        last = self.sent == self.size
        if self.pipelined:
            head = f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode("ascii")
            return head + chunk, [last]
        head = b"" if self._started else f"BDAT {self.size} LAST\r\n".encode("ascii")
        self._started = True
        return head + chunk, [True] if last else []

    def finish(self) -> tuple[bytes, list[bool]]:
        """The content ended: what is left to write (C{BDAT 0 LAST} for no content).
        @raise SizeMismatchError: less content than C{size}.
        @raise BareNewlineError: it ended in a bare CR."""
        if self._checker is not None:
            self._checker.finish()
        if self.sent != self.size:
            raise SizeMismatchError(f"{self.sent} octets instead of the {self.size} announced")
        if self.size == 0 and not self._started:
            self._started = True
            return b"BDAT 0 LAST\r\n", [True]
        return b"", []


def setNoDelay(transport: Any) -> None:
    """Turn Nagle's algorithm off: a command or the final dot written while the previous
    segment is unacknowledged would otherwise wait for the peer's delayed ACK (up to 40 ms on
    Linux) -- measured as the largest cost per message in the benchmark."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        handle = getattr(transport, "transport", None)  # TLS wraps the TCP transport
        setter = getattr(handle, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:  # pragma: no cover - not a TCP socket
            pass


#: Twisted's own TCP transports (C{twisted.internet.tcp.Server} and C{Client}), named rather
#: than imported: this layer is sans-IO and imports nothing of Twisted.
_PLAIN_TCP = frozenset({("twisted.internet.tcp", "Server"), ("twisted.internet.tcp", "Client")})


def writeNow(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, but on a plain TCP connection (Twisted's own, not TLS) with
    nothing waiting in its buffer, C{send} it at once instead of registering write interest
    and sending from the next reactor iteration: saves two C{epoll_ctl} calls and a pass of
    the reactor per reply or command.  What the socket does not take at once (or an error)
    goes to C{transport.write}, which sends it when writable (or reports the error as
    Twisted does)."""
    kind = type(transport)
    if (
        (kind.__module__, kind.__qualname__) in _PLAIN_TCP
        and transport.TLS is False
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error transport.write's doWrite will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def printable(text: str) -> str:
    """C{text} with every character outside printable ASCII replaced by C{"?"}."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def replyDiagnostic(reply: Reply) -> str:
    """The RFC 3464 Diagnostic-Code of a reply: C{"smtp; 550 5.1.1 user unknown"}."""
    text = " ".join(line.strip() for line in reply.text.split("\n") if line.strip())
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    return printable(f"smtp; {head} {text}".rstrip())[:MAX_DIAGNOSTIC]


def statusOf(reply: Reply) -> tuple[DeliveryStatus, str]:
    """The delivery status and RFC 3463 code a 2xx, 4xx or 5xx reply means."""
    cls = str(reply.code)[0]
    status = {"2": DeliveryStatus.DELIVERED, "4": DeliveryStatus.TRANSIENT,
              "5": DeliveryStatus.PERMANENT}[cls]
    code = reply.enhanced if reply.enhanced.startswith(cls + ".") else f"{cls}.0.0"
    return status, code


def orcptValue(recipient: Recipient, utf8: bool) -> str:
    """The ORCPT parameter value to relay for C{recipient} (RFC 3461 4.2, RFC 6533)."""
    if recipient.orcpt:
        kind, _, value = recipient.orcpt.partition(";")
    else:
        kind, value = "rfc822", recipient.address
    if kind.lower() == "utf-8":
        # Kept as received (utf-8-addr-xtext or, with SMTPUTF8, utf-8-addr-unitext).
        if value.isascii() or utf8:
            return f"utf-8;{value}"
        return f"utf-8;{utf8AddrXtext(utf8AddrDecode(value))}"  # (its escapes not escaped)
    if kind.lower() == "rfc822" and not value.isascii():
        return f"utf-8;{utf8AddrXtext(value)}"
    return f"{kind};{xtextEncode(value)}"


def asciiName(name: str) -> bytes:
    """A host name for EHLO/HELO/LHLO: IDNA A-labels when it is not ASCII."""
    return name.encode("ascii") if name.isascii() else name.encode("idna")


def parseExtensions(reply: Reply) -> dict[str, str]:
    """The EHLO keywords of a 2xx reply to EHLO/LHLO (upper case) to their parameters; the
    pre-RFC 4954 C{AUTH=...} lines count as C{AUTH} when there is no C{AUTH} line."""
    extensions: dict[str, str] = {}
    legacyAuth: list[str] = []
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword.startswith("AUTH="):  # pre-RFC 4954 servers
            legacyAuth += [keyword[5:], params.strip()]
            continue
        extensions[keyword] = params.strip()
    if "AUTH" not in extensions and legacyAuth:
        extensions["AUTH"] = " ".join(p for p in legacyAuth if p)
    return extensions

"""Reading a message's content, sans-IO and in bulk: in DATA (RFC 5321 4.5.2 and 4.5.3.1.6)
and in BDAT chunks (RFC 3030).

L{DataReader} takes what the client sends after the 354 reply, as it comes, and finds the end
of data: only C{<CRLF>.<CRLF>}, so a bare CR or LF never ends or splits a message.  It removes
the dot-stuffing and checks the content it passes on, in this order: NUL bytes, the length of
every line (counted after un-stuffing), bare LF, and the size limit (a bare CR, which ends
no line, is made a space first, as Postfix's cleanup does).  The first check a
message fails is its refusal (L{DataReader.error}); the rest of it is then read to the end
marker and dropped.  The work is done with C{bytes} methods over whole chunks, never one
Python call per line and no list of lines: one search (L{_DOT_LINE}) for the end marker and
the first line to un-stuff (C{"\r\n."}), then, after such a line, one for the end marker
(L{_END_OF_DATA}), C{memchr} for NUL, two C{translate}s compared
for bare CR or LF, and for long lines a C{rfind} of the last line end in each window of 1000
octets (about one call per kilobyte).

L{ChunkReader} takes the octets of a message's BDAT chunks, which the chunk sizes frame: no
end marker, no dot-stuffing, cut anywhere (even between a CR and its LF).  A text message
(C{BODY=7BIT} or C{8BITMIME}) gets the same checks as in DATA: RFC 3030 wants text sent by
BDAT in canonical form (CRLF line ends), RFC 5322 and RFC 2045 allow no NUL, no bare CR or
LF and no line over 998 octets in it, whatever the command that carried it; and a message
taken by BDAT may leave by DATA to a next hop without CHUNKING, where a bare LF or a NUL
could end it early for a lax receiver (SMTP smuggling).  So the listener's C{bare_newline}
and C{nul_bytes} choices apply to BDAT as to DATA.  (Postfix's smtpd also applies its
bare-newline policy to BDAT content.)  A C{BODY=BINARYMIME} message is any octets: only its
size is checked.
"""

from __future__ import annotations

import re

from mailrelay.smtp import replies as R
from mailrelay.smtp.replies import Reply

#: RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF, counted after
#: un-stuffing (the line "." + 997 octets is 999 on the wire, and legal).
MAX_DATA_LINE = 998
#: In DATA, a partial line longer than this is processed without waiting for its end.
DATA_PARTIAL_FLUSH = 65536

BARE_NEWLINE_REJECT = "reject"
BARE_NEWLINE_NORMALIZE = "normalize"

_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
#: A CR not followed by LF: with C{"normalize"}, a space (see L{_Checks._check}).
_BARE_CR = re.compile(rb"\r(?!\n)")
#: C{translate} tables marking the CRs and the LFs of a chunk (1) among other octets (0).
_CR_MARKS = bytes(int(octet == 13) for octet in range(256))
_LF_MARKS = bytes(int(octet == 10) for octet in range(256))
#: A line starting with a dot (its preceding CRLF): the end marker or a line to un-stuff.
#: Searched with C{re}, whose search for a literal prefix is a tight C loop over the octets
#: for its first one: two to four times faster than C{bytes.find} for a needle this short
#: (24 against 37 us per 64 KiB of 80-octet lines, 36 against 139 of empty lines), most of
#: the reading of a large message.
_DOT_LINE = re.compile(rb"\r\n\.")
#: The end of data (its CRLF, the dot line and its CRLF), searched with C{re} likewise: 2 to
#: 2.5 times faster than C{bytes.find} here.
_END_OF_DATA = re.compile(rb"\r\n\.\r\n")
#: A dot starting a line after a bare LF.
_DOT_AFTER_BARE_LF = re.compile(rb"(?<!\r)\n\.")


def _hasBareNewline(chunk: bytes) -> bool:
    """Does C{chunk} hold a CR not followed by LF, or a LF not preceded by CR?  (Its first
    octet has nothing before it, its last nothing after it.)

    Every CR is followed by a LF and every LF preceded by a CR when the chunk's CRs, moved on
    by one octet, are exactly its LFs: two C{translate}s and a compare, in C.
    """
    if chunk[:1] == b"\n" or chunk[-1:] == b"\r":
        return True
    return chunk.translate(_CR_MARKS)[:-1] != chunk.translate(_LF_MARKS)[1:]


def _hasLongCRLFLine(chunk: bytes) -> bool:
    """L{_hasLongLine} for a chunk whose line ends are all CRLF: each step looks for the last
    LF among the next 1000 octets (a line of at most 998 octets and its CRLF must end
    there), so it takes about one C{rfind} per kilobyte and copies nothing."""
    start, size, rfind = 0, len(chunk), chunk.rfind
    while size - start > MAX_DATA_LINE:
        end = rfind(b"\n", start, start + MAX_DATA_LINE + 2)
        if end < 0:
            return True
        start = end + 1
    return False


def _hasLongLine(chunk: bytes) -> bool:
    """Does C{chunk} hold a line of more than 998 octets?  A bare LF also ends a line here,
    as it will once normalised, and a bare CR (there is none: bare CRs are spaces before
    this is asked).

    C{bytes.split} runs in C: measured 80 times faster than a C{[^\\r\\n]{999}} regex search.
    """
    if max(map(len, chunk.split(b"\r\n"))) <= MAX_DATA_LINE:
        return False
    return max(map(len, _ANY_NEWLINE.split(chunk))) > MAX_DATA_LINE


class _Checks:
    """The checks of a text message's content (see the module docstring), chunk by chunk.

    @ivar size: the octets of content passed on so far (un-stuffed, normalised).
    @ivar error: the reply refusing the message (552 too big, 500 line too long, 550 bare
        newline or NUL), or C{None} while it is acceptable.
    """

    def __init__(self, maxSize: int, bareNewline: str = BARE_NEWLINE_REJECT,
                 nulBytes: str = BARE_NEWLINE_REJECT) -> None:
        """
        @param maxSize: the largest message accepted, in octets.
        @param bareNewline: a bare LF: C{"reject"} the message, or C{"normalize"}: it
            becomes CRLF (Postfix's C{smtpd_forbid_bare_newline}).  A bare CR is a space
            either way (as Postfix's cleanup makes it).
        @param nulBytes: NUL bytes: C{"reject"} the message, or C{"normalize"}: remove them.
        """
        self.maxSize = maxSize
        self.bareNewline = bareNewline
        self.nulBytes = nulBytes
        self.size = 0
        self.error: Reply | None = None
        self._lineLen = 0

    def _check(self, chunk: bytes, atLineStart: bool) -> bytes | None:
        """Check one chunk of content (un-stuffed): what to store of it, or C{None} (nothing
        once the message is refused).  C{atLineStart}: the chunk starts a line (else it
        continues the partial line the previous one ended with)."""
        # NUL: "\r\n\0.\r\n" is an end of data to a receiver that strips NULs.
        if b"\0" in chunk:
            if self.nulBytes != BARE_NEWLINE_NORMALIZE:
                self.error = R.NUL_IN_DATA
                return None
            chunk = chunk.replace(b"\0", b"")
        bare = _hasBareNewline(chunk)
        if bare:
            # A bare CR ends no line (RFC 5321 2.3.8: only CRLF does), whatever bare_newline
            # says (it is about bare LF, as Postfix's smtpd_forbid_bare_newline): Postfix's
            # smtpd reads a line to its LF, and its cleanup replaces each stray CR with a
            # space (cleanup_replace_stray_cr_lf, on by default).  As a line end it split a
            # header field in two ("Subject: a<CR>Bcc: victim").
            chunk = _BARE_CR.sub(b" ", chunk)
            bare = _hasBareNewline(chunk)
        # Line length, of the text un-stuffed (RFC 5321 4.5.3.1.6: the line "." + 997 octets
        # is 999 octets on the wire): the first line continues the partial line carried over.
        # A bare LF ends a line too (it will once normalised; else it is refused).
        first = chunk.find(b"\n")
        if bare:
            cr = chunk.find(b"\r")
            first = cr if 0 <= cr < first or first < 0 else first
        elif first > 0:
            first -= 1  # (its CR)
        firstLen = (first if first >= 0 else len(chunk)) + (0 if atLineStart else self._lineLen)
        if firstLen > MAX_DATA_LINE or (
            len(chunk) > MAX_DATA_LINE
            and (_hasLongLine(chunk) if bare else _hasLongCRLFLine(chunk))
        ):
            self.error = R.DATA_LINE_TOO_LONG
            return None
        lastEnd = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        self._lineLen = len(chunk) - lastEnd - 1 if lastEnd >= 0 else firstLen
        # Bare CR / LF.
        if bare:
            if self.bareNewline == BARE_NEWLINE_NORMALIZE:
                chunk = _BARE.sub(b"\r\n", chunk)
            else:
                self.error = R.BARE_NEWLINE
                return None
        return self._count(chunk)

    def _count(self, chunk: bytes) -> bytes | None:
        """C{chunk}, counted against the size limit (C{None} past it)."""
        self.size += len(chunk)
        if self.size > self.maxSize:
            self.error = R.SIZE_EXCEEDED
            return None
        return chunk


class DataReader(_Checks):
    """The content of one message in DATA (see L{_Checks} for C{size} and C{error})."""

    def __init__(self, maxSize: int, bareNewline: str = BARE_NEWLINE_REJECT,
                 nulBytes: str = BARE_NEWLINE_REJECT) -> None:
        super().__init__(maxSize, bareNewline, nulBytes)
        self._atLineStart = True

    def read(self, buf: bytes, pos: int) -> tuple[int, bytes | None, bool] | None:
        """Read the content in C{buf} from C{pos} on, as far as it can be read now.

        @return: C{None} when nothing can be read before more bytes arrive; otherwise where
            reading stopped in C{buf}, the content to store (un-stuffed, CRLF line ends only)
            or C{None} for nothing, and whether the end of data was reached (then the position
            is just after the terminating line).
        """
        if pos >= len(buf):
            return None
        if self._atLineStart:
            # The terminating line can only be at a line start.
            if buf.startswith(b".\r\n", pos):
                return pos + 3, None, True
            if len(buf) - pos < 3 and b".\r\n".startswith(buf[pos:]):
                return None  # ".", ".\r": wait for more
        # The first "\r\n." starts the end marker or the first line to un-stuff; in the
        # second case one more search finds the marker, the first "\r\n.\r\n" (a CRLF
        # always ends a line).  Two searches at most, whatever the number of dot-stuffed
        # lines: one search for each (in Python) made them 20 times as costly to read as
        # empty lines, the reactor blocked meanwhile.
        dotLine = -1  # where the first line to un-stuff starts (its "\r\n"), if any
        match = _DOT_LINE.search(buf, pos)
        end = -1
        if match is not None:
            end = match.start()
            if not buf.startswith(b"\r\n", end + 3):
                dotLine = end
                marker = _END_OF_DATA.search(buf, end + 3)
                end = -1 if marker is None else marker.start()
        if end >= 0:
            content = self._content(buf[pos : end + 2], self._atLineStart, dotLine >= 0)
            return end + 5, content, True
        # No end marker yet: process up to the last complete line, keeping a possible start of
        # the marker ("\r\n.\r" at most) in the buffer.
        last = buf.rfind(b"\r\n", pos)
        if last >= 0:
            cut = last + 2
        elif len(buf) - pos > DATA_PARTIAL_FLUSH:
            cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        else:
            return None
        if cut <= pos:
            return None
        content = self._content(buf[pos:cut], self._atLineStart, 0 <= dotLine < cut - 2)
        # (Cut after a bare LF, when normalising: that ends a line too.)
        self._atLineStart = last >= 0 or (
            self.bareNewline == BARE_NEWLINE_NORMALIZE and buf.endswith(b"\n", pos, cut)
        )
        return cut, content, False

    def _content(self, chunk: bytes, atLineStart: bool, dotLines: bool) -> bytes | None:
        """Un-stuff and check one chunk of content (not the terminating line): what to store
        of it, or C{None} (nothing once the message is refused).  C{dotLines}: a line after
        the first starts with a dot."""
        if not chunk:
            return None
        if self.error is not None:
            return None  # consume to the end marker, store nothing
        # Dot-unstuffing, exact: a leading "." of every line is removed.
        if atLineStart and chunk.startswith(b"."):
            chunk = chunk[1:]
        if dotLines:
            chunk = chunk.replace(b"\r\n.", b"\r\n")
        if self.bareNewline == BARE_NEWLINE_NORMALIZE:
            # A bare LF ends a line too once normalised (as Postfix's smtpd reads a client
            # that ends lines with LF alone): the line after it is un-stuffed.  (Those after
            # a CRLF were, just above: the look-behind spares them.  A bare CR ends none.)
            chunk = _DOT_AFTER_BARE_LF.sub(b"\n", chunk)
        return self._check(chunk, atLineStart)


class ChunkReader(_Checks):
    """The content of one message in BDAT chunks (RFC 3030), fed as it comes, cut anywhere
    (see L{_Checks} for C{size} and C{error}; the module docstring says what is checked).

    A text message that does not end with a line end gets CRLF added at its end (as Postfix
    does): it may leave by DATA, whose end marker needs one.
    """

    def __init__(self, maxSize: int, bareNewline: str = BARE_NEWLINE_REJECT,
                 nulBytes: str = BARE_NEWLINE_REJECT, binary: bool = False) -> None:
        """
        @param binary: the message is C{BODY=BINARYMIME}: any octets, only the size is
            checked, nothing is added.
        """
        super().__init__(maxSize, bareNewline, nulBytes)
        self.binary = binary
        self._atLineStart = True
        #: The content passed on so far ended with a CR held back: is it followed by LF?
        self._heldCR = False

    def feed(self, data: bytes) -> bytes | None:
        """Take the next octets of the message: what to store of them now, or C{None}."""
        if self.error is not None or not data:
            return None
        if self.binary:
            return self._count(data)
        if self._heldCR:
            data = b"\r" + data
            self._heldCR = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._heldCR = True
            if not data:
                return None
        atLineStart = self._atLineStart
        self._atLineStart = data.endswith(b"\n")
        return self._check(data, atLineStart)

    def end(self) -> bytes | None:
        """The last chunk ended: what is left to store (a CR held back, which is then bare,
        and the CRLF a text message without a final line end gets), or C{None}."""
        if self.error is not None or self.binary:
            return None
        tail = b"\r" if self._heldCR else b""
        self._heldCR = False
        if not tail and (self._atLineStart or self.size == 0):
            return None
        return self._check(tail + b"\r\n", self._atLineStart)

"""The MIME ACL (``acl_smtp_mime``), the ``decode`` and ``mime_regex``
conditions and the $mime_* variables.

The parser is tested on its own first; then whole sessions go through the
in-memory Harness, and one message goes from swaks to a running daemon.
Every reply and log line expected in the session tests is what Exim 4.96
(Debian's exim4-daemon-heavy, ``exim4 -bh 192.0.2.1``) gave for the same
configuration and message, with message ids written ``ID`` and the spool
directory ``SPOOL``.
"""

from __future__ import annotations

import os
import re
import tempfile

from tests.test_daemon_peers import DaemonTestCase, server_lines, swaks
from tests.test_dialogues import Harness, _TempDirCase, config_from_text
from twisted_mta.smtp.mime import (
    ANOMALY_BASE64,
    ANOMALY_QP,
    Stream,
    decode_base64,
    decode_qp,
    decode_words,
    find_boundary,
    next_part,
    parse_headers,
    part_body,
    read_header,
)

ID = re.compile(r"\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\b")


def headers_of(text: bytes) -> list[bytes]:
    """The header lines of a part as the parser reads them."""
    return next_part(Stream(text), None) or []


def walk(data: bytes) -> list[tuple[int, dict[str, bytes | None]]]:
    """(depth, values) for every part, walked as the MIME ACL walks them
    (without the message/rfc822 pass): a test double of MimeScan._check."""
    found: list[tuple[int, dict[str, bytes | None]]] = []
    stream = Stream(data)

    def level(boundary: bytes | None, depth: int) -> None:
        while True:
            lines = next_part(stream, boundary)
            if lines is None:
                return
            part = parse_headers(lines)
            found.append((depth, part.values))
            content_type = part.content_type or b""
            if part.boundary is not None and content_type.startswith(b"multipart"):
                level(part.boundary, depth + 1)
            if boundary is None:
                return

    level(None, 0)
    return found


# -- the parser --------------------------------------------------------------------

class HeaderLineTests(_TempDirCase):
    """read_header(): Exim's way of reading a part's header lines."""

    def test_folding_blanks_and_comments(self) -> None:
        stream = Stream(b"Content-Type: text/plain (a comment);\n"
                        b"\tcharset = \"us-ascii (kept)\" ; name=a b\nX: y\n\nbody\n")
        line, more = read_header(stream)
        self.assertTrue(more)
        # Outside values blanks and comments go; inside a value they stay,
        # tabs (control characters) never do.
        self.assertEqual(line, b'Content-Type:text/plain;charset="us-ascii (kept)" ;name=a b;')
        self.assertEqual(read_header(stream), (b"X:y;", True))
        self.assertEqual(read_header(stream), (b";", False))
        self.assertEqual(stream.data[stream.pos:], b"body\n")

    def test_end_of_data(self) -> None:
        # Exim's quirk: with no newline the last byte becomes the ";", and
        # the line is not used (the flag says the block ended).
        self.assertEqual(read_header(Stream(b"Content-Type: text/plain")),
                         (b"Content-Type:text/plai;", False))

    def test_backslash_quotes_a_bracket(self) -> None:
        line, _ = read_header(Stream(b"Content-ID: <a\\(b>\n\n"))
        self.assertEqual(line, b"Content-ID:<a(b>;")


class ParameterTests(_TempDirCase):
    """parse_headers(): the values and parameters Exim picks out."""

    def values(self, text: bytes) -> dict[str, bytes | None]:
        return parse_headers(headers_of(text)).values

    def test_values_lower_cased(self) -> None:
        values = self.values(b"Content-Type: Text/HTML; Charset=UTF-8\n"
                             b"Content-Description: My Cool File\n"
                             b"Content-ID: <ABC@Example>\n"
                             b"Content-Transfer-Encoding: BASE64\n\n")
        self.assertEqual(values["mime_content_type"], b"text/html")
        self.assertEqual(values["mime_charset"], b"UTF-8")
        self.assertEqual(values["mime_content_description"], b"mycoolfile")
        self.assertEqual(values["mime_content_id"], b"<abc@example>")
        self.assertEqual(values["mime_content_transfer_encoding"], b"base64")
        self.assertIsNone(values["mime_filename"])

    def test_quoted_semicolon_and_trailing_blank(self) -> None:
        values = self.values(b'Content-Type: text/plain; charset = "x" ; name="a;b.exe"\n\n')
        self.assertEqual(values["mime_charset"], b"x ")
        self.assertEqual(values["mime_filename"], b"a;b.exe")

    def test_encoded_word_filename(self) -> None:
        values = self.values(b'Content-Type: application/x; name="=?utf-8?B?w6lsw6ku?= exe"\n\n')
        self.assertEqual(values["mime_filename"], "élé. exe".encode())

    def test_rfc2231_filename_in_pieces(self) -> None:
        values = self.values(b"Content-Disposition: attachment;\n"
                             b"  filename*0*=iso-8859-1''part%E9one;\n"
                             b"  filename*1*=two.pdf\n\n")
        self.assertEqual(values["mime_content_disposition"], b"attachment")
        self.assertEqual(values["mime_filename"], b"part\xe9onetwo.pdf")

    def test_rfc2231_beats_an_earlier_filename(self) -> None:
        values = self.values(b"Content-Disposition: INLINE; filename=first.txt; "
                             b"filename*=''second%41.txt\n\n")
        self.assertEqual(values["mime_filename"], b"secondA.txt")
        self.assertEqual(values["mime_content_disposition"], b"inline")

    def test_rfc2231_name_and_no_charset(self) -> None:
        self.assertEqual(self.values(b"Content-Type: a/b; name*=UTF-8''foo%20bar.exe\n\n")
                         ["mime_filename"], b"foo bar.exe")
        self.assertEqual(self.values(b"Content-Disposition: a; filename*=noquote.exe\n\n")
                         ["mime_filename"], b"noquote.exe")

    def test_rfc2231_undecodable_kept_raw(self) -> None:
        # A blank or a stray "=" spoils the encoded word: the raw value stays.
        for raw in (b"iso-8859-1'en'r%E9sum%E9 file.doc", b"us-ascii''my_file=x.exe"):
            values = self.values(b"Content-Disposition: attachment; filename*=" + raw + b"\n\n")
            self.assertEqual(values["mime_filename"], raw)

    def test_empty_value_unsets(self) -> None:
        values = self.values(b'Content-Type: a/b; name=x.exe\nContent-Disposition: a; '
                             b'filename=""\n\n')
        self.assertIsNone(values["mime_filename"])

    def test_decode_words(self) -> None:
        self.assertEqual(decode_words(b"=?iso-8859-1?Q?a_b?= =?us-ascii?B?Yw==?= d"),
                         b"a bc d")
        self.assertEqual(decode_words(b"plain"), b"plain")
        long_word = b"=?us-ascii?Q?" + b"a" * 70 + b"?="
        self.assertEqual(decode_words(long_word), long_word)
        self.assertEqual(decode_words(long_word, lencheck=False), b"a" * 70)


NESTED = b"""Subject: test
Content-Type: multipart/mixed; boundary=outer

preamble
--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain

plain
--inner
Content-Type: text/html

<p>html</p>
--inner--
--outer
Content-Type: message/rfc822

Subject: inner
Content-Type: text/plain

inner body
--outer
Content-Type: application/pdf; name=x.pdf

%PDF
--outer--
epilogue
"""


class StructureTests(_TempDirCase):
    """next_part() and find_boundary(): how parts are found."""

    def test_nested_multipart(self) -> None:
        found = [(depth, values["mime_content_type"], values["mime_filename"])
                 for depth, values in walk(NESTED)]
        self.assertEqual(found, [
            (0, b"multipart/mixed", None), (1, b"multipart/alternative", None),
            (2, b"text/plain", None), (2, b"text/html", None),
            (1, b"message/rfc822", None), (1, b"application/pdf", b"x.pdf")])

    def test_missing_boundary_parameter(self) -> None:
        found = walk(b"Content-Type: multipart/mixed\n\n--x\nContent-Type: text/plain\n\nhi\n")
        self.assertEqual([v["mime_content_type"] for _, v in found], [b"multipart/mixed"])

    def test_missing_closing_boundary(self) -> None:
        found = walk(b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
                     b"Content-Type: multipart/related; boundary=r\n\n--r\n"
                     b"Content-Type: text/html\n\n--b\nContent-Type: image/png\n\n")
        # The related part never ends: it swallows the rest of the message.
        self.assertEqual([v["mime_content_type"] for _, v in found],
                         [b"multipart/mixed", b"multipart/related", b"text/html"])

    def test_boundary_matched_as_prefix(self) -> None:
        found = walk(b"Content-Type: multipart/mixed; boundary=ab\n\n--abc\n"
                     b"Content-Type: text/plain\n\nx\n--ab--\n")
        self.assertEqual([v["mime_content_type"] for _, v in found],
                         [b"multipart/mixed", b"text/plain"])

    def test_find_boundary_pieces(self) -> None:
        # A long line is read in pieces: a marker at a piece start counts.
        data = b"x" * 10 + b"--b\n--b--\n"
        self.assertEqual(find_boundary(data, 0, b"--b", 10), (10, 14))
        self.assertEqual(find_boundary(data, 0, b"--b", 11), (14, 20))
        self.assertEqual(find_boundary(b"no marker\n", 0, b"--b", 100), (-1, -1))

    def test_part_body_stops_at_boundary(self) -> None:
        data = b"line one\nline two\n--b\nmore\n"
        self.assertEqual(part_body(data, 0, b"b"), b"line one\nline two\n")
        self.assertEqual(part_body(data, 0, None), data)


class DecodingTests(_TempDirCase):
    """The base64 and quoted-printable decoders."""

    def test_base64(self) -> None:
        self.assertEqual(decode_base64(b"aGVsbG8gd29ybGQK\n"), (b"hello world\n", None))
        self.assertEqual(decode_base64(b"QQ==\n"), (b"A", None))
        # Bad characters are skipped and flagged; an unpadded end leaves
        # its incomplete byte behind, as in Exim.
        self.assertEqual(decode_base64(b"Zm9v!YmFy\nQQ\n"), (b"foobarA\0", ANOMALY_BASE64))
        self.assertEqual(decode_base64(b"Zm9v YmFy\r\n"), (b"foobar", ANOMALY_BASE64))

    def test_base64_padding_inside(self) -> None:
        # "=" only moves the decoder on, so data after padding still counts.
        self.assertEqual(decode_base64(b"QQ==Zm9v\n"), (b"Afoo", None))
        self.assertEqual(decode_base64(b"QQ=\n"), (b"A\0", None))

    def test_quoted_printable(self) -> None:
        self.assertEqual(decode_qp(b"caf=E9 soft=\nbreak end\n"), (b"caf\xe9 softbreak end\n",
                                                                   None))
        self.assertEqual(decode_qp(b"soft = \t\nx =ZZ y=\n"), (b"soft x =ZZ y", ANOMALY_QP))
        self.assertEqual(decode_qp(b"end="), (b"end=", ANOMALY_QP))


# -- sessions --------------------------------------------------------------------------

SHOW = ("MIME n=$mime_part_count t=[$mime_content_type] d=[$mime_content_disposition] "
        "f=[$mime_filename] cs=[$mime_charset] b=[$mime_boundary] "
        "cte=[$mime_content_transfer_encoding] id=[$mime_content_id] "
        "desc=[$mime_content_description] mp=$mime_is_multipart cl=$mime_is_coverletter "
        "r822=$mime_is_rfc822")

DUMP_CONFIG = f"""
spool_directory = SPOOLDIR
acl_smtp_rcpt = r
acl_smtp_mime = m
acl_smtp_data = d
begin acl
r:
  accept
m:
  warn logwrite = {SHOW}
  warn decode = default
       logwrite = DEC df=[$mime_decoded_filename] sz=$mime_content_size \\
                  al=$mime_anomaly_level at=[$mime_anomaly_text] \\
                  [${{readfile{{$mime_decoded_filename}}}}]
  accept
d:
  warn logwrite = DATA n=$mime_part_count r822=$mime_is_rfc822 cl=$mime_is_coverletter \\
                  t=[$mime_content_type] df=[$mime_decoded_filename]
  accept
"""

EXE_CONFIG = r"""
spool_directory = SPOOLDIR
acl_smtp_rcpt = r
acl_smtp_mime = m
begin acl
r:
  accept
m:
  deny message = no exe files
       condition = ${if match{$mime_filename}{\N\.exe$\N}}
  accept
"""

ATTACHMENT = b"""Subject: test
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XX-b1"

preamble
--XX-b1
Content-Type: text/plain; charset="us-ascii"

hello
--XX-b1
Content-Type: application/octet-stream; name="evil.exe"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="evil.exe"

aGVsbG8gd29ybGQK
--XX-b1--
"""

SIMPLE = b"Subject: t\nContent-Type: text/plain\n\nhello\n"


def verdict_config(statements: str) -> str:
    return ("spool_directory = SPOOLDIR\nacl_smtp_rcpt = r\nacl_smtp_mime = m\n"
            "acl_smtp_data = d\nbegin acl\nr:\n  accept\nm:\n" + statements
            + "d:\n  warn logwrite = DATA ACL ran $h_x-acl-warn:\n  accept\n")


REGEX_CONFIG = r"""
spool_directory = SPOOLDIR
acl_smtp_rcpt = r
acl_smtp_mime = m
begin acl
r:
  accept
m:
  accept condition = ${if eq{$mime_part_count}{0}}
  warn mime_regex = b(a)r : f(o)(o)
       logwrite = R1 [$regex_match_string] [$regex1] [$regex2] \
                  df=[$mime_decoded_filename] sz=$mime_content_size al=$mime_anomaly_level
  warn !mime_regex = nomatch
       logwrite = R2 [$regex_match_string] [$regex1]
  warn mime_regex = zz( : (x)(y)
       logwrite = never
  warn decode = rel-$mime_part_count
       logwrite = D df=[$mime_decoded_filename]
  warn !decode = false
       logwrite = false fails
  accept
"""

BASE64_PARTS = b"""Subject: t
Content-Type: multipart/mixed; boundary=b

--b
Content-Transfer-Encoding: BASE64

Zm9v!YmFy
--b
Content-Transfer-Encoding: quoted-printable

ba=72
--b--
"""


class MimeSessionTests(_TempDirCase):
    """Whole SMTP sessions (Harness) with a MIME ACL; replies and log lines
    as Exim gives them."""

    def session(self, config: str, message: bytes) -> tuple[bytes, list[str]]:
        spool = tempfile.mkdtemp(dir=self.tmp)
        harness = Harness(config_from_text(config.replace("SPOOLDIR", spool)), spool,
                          peer=("192.0.2.1", 40000))
        self.spool = spool
        harness.connect()
        for command in (b"EHLO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<u@d.e>\r\n",
                        b"DATA\r\n"):
            harness.send(command)
        harness.output()
        harness.send(message.replace(b"\n", b"\r\n") + b".\r\n")
        reply = ID.sub("ID", harness.output().decode("latin-1"))
        lines = [ID.sub("ID", line).replace(spool, "SPOOL")
                 for line in harness.log_lines()]
        return reply.encode("latin-1"), lines

    def test_deny_exe(self) -> None:
        reply, log = self.session(EXE_CONFIG, ATTACHMENT)
        self.assertEqual(reply, b"550 no exe files\r\n")
        self.assertEqual(log, ["ID H=(x) [192.0.2.1] F=<a@b.c> rejected during MIME ACL "
                               "checks: no exe files"])
        self.assertEqual(os.listdir(self.spool + "/input"), [])

    def test_not_mime(self) -> None:
        # MIME-Version alone is not enough: the ACL needs a Content-Type.
        reply, log = self.session(EXE_CONFIG, b"MIME-Version: 1.0\n\n--x\n"
                                              b"Content-Type: a/b; name=x.exe\n\nx\n")
        self.assertEqual(reply, b"250 OK id=ID\r\n")
        self.assertEqual(log, ["ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=225"])

    def test_parts_variables_and_decoding(self) -> None:
        message = NESTED.replace(b"plain\n--inner", b"caf=E9 soft=\nbreak =ZZ end=\n--inner"
                                 ).replace(b"Content-Type: text/plain\n\ncaf",
                                           b"Content-Type: text/plain; charset=iso-8859-1\n"
                                           b"Content-Transfer-Encoding: quoted-printable\n\ncaf")
        reply, log = self.session(DUMP_CONFIG, message)
        self.assertEqual(reply, b"250 OK id=ID\r\n")
        self.assertEqual(log, NESTED_LOG)
        # The decoded files went with the message.
        self.assertEqual(os.listdir(os.path.join(self.spool, "scan")), [])

    def test_mime_regex_and_decode(self) -> None:
        reply, log = self.session(REGEX_CONFIG, BASE64_PARTS)
        self.assertEqual(reply, b"250 OK id=ID\r\n")
        self.assertEqual(log, REGEX_LOG)

    def test_data_acl_discard_after_decode(self) -> None:
        config = ("spool_directory = SPOOLDIR\nacl_smtp_rcpt = r\nacl_smtp_mime = m\n"
                  "acl_smtp_data = d\nbegin acl\nr:\n  accept\nm:\n  warn decode = default\n"
                  "  accept\nd:\n  discard log_message = bye\n")
        reply, log = self.session(config, SIMPLE)
        self.assertEqual(reply, b"250 OK id=ID\r\n")
        self.assertEqual(log, ["ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=212",
                               "ID => blackhole (DATA ACL discarded recipients): bye",
                               "ID Completed"])
        self.assertEqual(os.listdir(os.path.join(self.spool, "scan")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool, "input")), [])

    def test_no_mbox_unspool_keeps_files(self) -> None:
        config = ("spool_directory = SPOOLDIR\nacl_smtp_rcpt = r\nacl_smtp_mime = m\n"
                  "begin acl\nr:\n  accept\nm:\n  warn control = no_mbox_unspool\n"
                  "       decode = default\n  accept\n")
        reply, log = self.session(config, SIMPLE)
        self.assertEqual(reply, b"250 OK id=ID\r\n")
        self.assertEqual(log, ["ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=212"])
        (message_id,) = os.listdir(os.path.join(self.spool, "scan"))
        with open(os.path.join(self.spool, "scan", message_id, f"{message_id}-00000"),
                  "rb") as f:
            self.assertEqual(f.read(), b"hello\n")

    def test_verdicts(self) -> None:
        for statements, reply, log in VERDICTS:
            with self.subTest(statements=statements):
                self.assertEqual(self.session(verdict_config(statements), SIMPLE),
                                 (reply, log))


# Exim's lines for test_parts_variables_and_decoding and test_mime_regex_and_decode
# and the verdicts.
NESTED_LOG: list[str] = [
    'ID MIME n=0 t=[multipart/mixed] d=[] f=[] cs=[] b=[outer] cte=[] id=[] desc=[] mp=1 '
    'cl=1 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00000] sz=1 al=0 at=[] [preamble\\n--outer\\nContent-Type: '
    'multipart/alternative; boundary="inner"\\n\\n--inner\\nContent-Type: text/plain; '
    'charset=iso-8859-1\\nContent-Transfer-Encoding: quoted-printable\\n\\ncaf=E9 '
    'soft=\\nbreak =ZZ end=\\n--inner\\nContent-Type: '
    'text/html\\n\\n<p>html</p>\\n--inner--\\n--outer\\nContent-Type: '
    'message/rfc822\\n\\nSubject: inner\\nContent-Type: text/plain\\n\\ninner '
    'body\\n--outer\\nContent-Type: application/pdf; '
    'name=x.pdf\\n\\n%PDF\\n--outer--\\nepilogue\\n]',
    'ID MIME n=1 t=[multipart/alternative] d=[] f=[] cs=[] b=[inner] cte=[] id=[] desc=[] '
    'mp=1 cl=1 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00001] sz=1 al=0 at=[] [--inner\\nContent-Type: '
    'text/plain; charset=iso-8859-1\\nContent-Transfer-Encoding: '
    'quoted-printable\\n\\ncaf=E9 soft=\\nbreak =ZZ end=\\n--inner\\nContent-Type: '
    'text/html\\n\\n<p>html</p>\\n--inner--\\n]',
    'ID MIME n=2 t=[text/plain] d=[] f=[] cs=[iso-8859-1] b=[] cte=[quoted-printable] id=[] '
    'desc=[] mp=0 cl=1 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00002] sz=1 al=1 at=[Broken Quoted-Printable encoding '
    'detected] [caf\\351 softbreak =ZZ end]',
    'ID MIME n=3 t=[text/html] d=[] f=[] cs=[] b=[] cte=[] id=[] desc=[] mp=0 cl=1 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00003] sz=1 al=0 at=[] [<p>html</p>\\n]',
    'ID MIME n=4 t=[message/rfc822] d=[] f=[] cs=[] b=[] cte=[] id=[] desc=[] mp=0 cl=0 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00004] sz=1 al=0 at=[] [Subject: inner\\nContent-Type: '
    'text/plain\\n\\ninner body\\n]',
    'ID MIME n=5 t=[application/pdf] d=[] f=[x.pdf] cs=[] b=[] cte=[] id=[] desc=[] mp=0 '
    'cl=0 r822=0',
    'ID DEC df=[SPOOL/scan/ID/ID-00005] sz=1 al=0 at=[] [%PDF\\n]',
    'ID MIME n=0 t=[text/plain] d=[] f=[] cs=[] b=[] cte=[] id=[] desc=[] mp=0 cl=1 r822=1',
    'ID DEC df=[SPOOL/scan/ID/ID-00006] sz=1 al=0 at=[] [inner body\\n]',
    'ID DATA n=5 r822=1 cl=1 t=[] df=[]',
    'ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=648',
]
REGEX_LOG: list[str] = [
    'ID R1 [f(o)(o)] [o] [o] df=[SPOOL/scan/ID/ID-00000] sz=1 al=2',
    'ID R2 [] []',
    "ID regex acl condition warning - error in regex 'zz(': missing closing parenthesis at "
    "offset 3, skipped.",
    'ID D df=[SPOOL/scan/ID/rel-1]',
    'ID false fails',
    'ID R1 [b(a)r] [a] [] df=[SPOOL/scan/ID/ID-00001] sz=1 al=0',
    'ID R2 [] []',
    "ID regex acl condition warning - error in regex 'zz(': missing closing parenthesis at "
    "offset 3, skipped.",
    'ID D df=[SPOOL/scan/ID/rel-2]',
    'ID false fails',
    'ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=333',
]
VERDICTS: list[tuple[str, bytes, list[str]]] = [
    ('  defer message = later please\n',
     b'451 later please\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected during MIME ACL checks: '
      'later please']),
    ('  drop message = go away\n',
     b'550 go away\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> rejected during MIME ACL checks: go away']),
    ('  discard log_message = dropped it\n',
     b'250 OK id=ID\r\n',
     ['ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=212',
      'ID => blackhole (MIME ACL discarded recipients)', 'ID Completed']),
    ('  deny\n',
     b'550 Administrative prohibition\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> rejected during MIME ACL checks']),
    ('  deny log_message = logged only\n',
     b'550 Administrative prohibition\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> rejected during MIME ACL checks: logged only']),
    ('  defer\n',
     b'451 Temporary local problem - please try later\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> temporarily rejected during MIME ACL checks']),
    ('  accept message = ignored\n',
     b'250 OK id=ID\r\n',
     ['ID DATA ACL ran ', 'ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=212']),
    ('  warn message = warned\n  accept\n',
     b'250 OK id=ID\r\n',
     ['ID DATA ACL ran warned', 'ID <= a@b.c H=(x) [192.0.2.1] P=esmtp S=231']),
    ('  deny message = 599 5.7.1 custom code\n    log_message = L\n',
     b'599 5.7.1 custom code\r\n',
     ['ID H=(x) [192.0.2.1] F=<a@b.c> rejected during MIME ACL checks: L']),
]


# -- a real client -------------------------------------------------------------------

class SwaksTests(DaemonTestCase):
    """swaks sends attachments to a running exim-py daemon."""

    CONFIG = (r"""acl_smtp_rcpt = r
acl_smtp_mime = m
begin acl
r:
  accept
m:
  deny message = no exe files
       condition = ${if match{$mime_filename}{\N\.exe$\N}}
  warn mime_regex = ^secret (\\w+)
       add_header = X-Secret: $regex1 in $mime_filename
  accept
""")

    def attachment(self, name: str, content: bytes) -> str:
        directory = tempfile.mkdtemp(prefix="exim-py-mime-")
        self.addCleanup(lambda: (os.unlink(path), os.rmdir(directory)))
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_exe_refused(self) -> None:
        daemon = self.daemon(self.CONFIG)
        result = swaks(daemon.port, "--attach", self.attachment("evil.exe", b"MZ fake exe\n"))
        replies = server_lines(result.stdout)
        self.assertIn("550 no exe files", replies)
        log = daemon.wait_for_log("rejected during MIME ACL checks")
        self.assertRegex(log, r"\S+-\S+-\S+ H=\(client\.test\) \[127\.0\.0\.1\] "
                              r"F=<s@x\.test> rejected during MIME ACL checks: no exe files")
        self.assertEqual(daemon.spool_ids(), [])

    def test_attachment_scanned(self) -> None:
        daemon = self.daemon(self.CONFIG)
        result = swaks(daemon.port, "--attach",
                       self.attachment("notes.txt", b"secret plans inside\n"))
        replies = server_lines(result.stdout)
        ok = [r for r in replies if r.startswith("250 OK id=")]
        self.assertEqual(len(ok), 1, replies)
        message_id = ok[0][len("250 OK id="):]
        daemon.wait_for_log(f"{message_id} <= ")
        self.assertIn("X-Secret: plans in notes.txt\n", daemon.header_file(message_id))
        # Nothing is left under scan/ once the message is in.
        scan = os.path.join(daemon.spool_directory, "scan")
        self.assertEqual(os.listdir(scan) if os.path.isdir(scan) else [], [])

"""Tests for twisted_mta.config; error texts were checked against exim4 4.96."""

from __future__ import annotations

import glob
import os
from datetime import datetime

from twisted.trial import unittest

from twisted_mta.config import (
    ConfigError,
    format_all_options,
    format_option,
    load_config,
    parse_config_text,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "config")


def parse(text: str, **kw):
    return parse_config_text(text, "/etc/x.conf", **kw)


class ErrorMixin:
    def assertConfigError(self, text: str, message: str, lineno: int | None = None,
                          filename: str | None = "/etc/x.conf") -> ConfigError:
        exc = self.assertRaises(ConfigError, parse, text)
        self.assertEqual(exc.message, message)
        self.assertEqual(exc.lineno, lineno)
        if lineno is not None:
            self.assertEqual(exc.filename, filename)
        return exc


class LineProcessingTests(unittest.TestCase):
    def test_macro_substitution_order(self):
        cfg = parse("AB = x-CD\nCD = later\nprimary_hostname = AB\n")
        # A later macro applies to an earlier one's replacement.
        self.assertEqual(cfg.get("primary_hostname"), "x-later")

    def test_replacement_not_rescanned_for_itself(self):
        cfg = parse("AB = AB-AB\nprimary_hostname = AB\n")
        self.assertEqual(cfg.get("primary_hostname"), "AB-AB")

    def test_macro_value_substituted_at_definition(self):
        cfg = parse("A1 = one\nB2 = A1 two\nprimary_hostname = B2\n")
        self.assertEqual(cfg.macros["B2"], "one two")
        self.assertEqual(cfg.get("primary_hostname"), "one two")

    def test_redefinition_and_defines(self):
        cfg = parse("AB = 1\nAB == 2\nCD = 3\nsmtp_accept_max = AB\nrecipients_max = CD\n",
                    defines={"CD": "9"})
        self.assertEqual(cfg.get("smtp_accept_max"), 2)
        self.assertEqual(cfg.get("recipients_max"), 9)
        names = list(cfg.macros)
        self.assertLess(names.index("CD"), names.index("AB"))

    def test_builtin_macros(self):
        cfg = parse(".ifdef _HAVE_REDIS\nprimary_hostname = yes\n.endif\n")
        self.assertEqual(cfg.get("primary_hostname"), "yes")
        for name in ("_HAVE_PRDR", "_HAVE_PROXY", "_HAVE_SOCKS", "_HAVE_SPF", "_HAVE_DMARC",
                     "_HAVE_DANE", "_HAVE_OCSP", "_HAVE_EVENT", "_HAVE_TLS", "_HAVE_DKIM",
                     "_HAVE_SRS", "_HAVE_DCC", "_DRIVER_ROUTER_ACCEPT",
                     "_DRIVER_TRANSPORT_SMTP", "_OPT_MAIN_PRDR_ENABLE",
                     "_OPT_TRANSPORT_SMTP_HOSTS_TRY_PRDR", "_ACL_COND_SPF"):
            self.assertEqual(cfg.macros[name], "y", name)

    def test_substitute_macros(self):
        cfg = parse("MY_MACRO = value\n")
        self.assertEqual(cfg.substitute_macros("x MY_MACRO y"), ("x value y", True))
        self.assertEqual(cfg.substitute_macros("nothing here"), ("nothing here", False))
        self.assertEqual(cfg.define_macro("NEW = v"), "NEW")
        self.assertEqual(cfg.substitute_macros("NEW"), ("v", True))

    def test_conditionals(self):
        text = (".ifdef NOPE\nprimary_hostname = a\n.elifdef AB\nprimary_hostname = b\n"
                ".else\nprimary_hostname = c\n.endif\n"
                ".ifndef AB\nqualify_domain = x\n.else\nqualify_domain = y\n.endif\n")
        cfg = parse("AB = 1\n" + text)
        self.assertEqual(cfg.get("primary_hostname"), "b")
        self.assertEqual(cfg.get("qualify_domain"), "y")
        cfg = parse(text)
        self.assertEqual(cfg.get("primary_hostname"), "c")
        self.assertEqual(cfg.get("qualify_domain"), "x")

    def test_nested_conditionals(self):
        cfg = parse(".ifdef NO\n.ifdef _HAVE_TLS\nprimary_hostname = a\n.endif\n"
                    ".else\nprimary_hostname = b\n.endif\n")
        self.assertEqual(cfg.get("primary_hostname"), "b")

    def test_comments_and_continuation(self):
        cfg = parse("  # comment\nprimary_hostname = a \\\n   b\\\n# inside\n  c\n\n"
                    "qualify_domain = x\\\n\nsmtp_banner = # not a comment\n")
        self.assertEqual(cfg.get("primary_hostname"), "a bc")
        self.assertEqual(cfg.get("qualify_domain"), "x")
        self.assertEqual(cfg.get("smtp_banner"), "# not a comment")

    def test_includes(self):
        cfg = load_config(os.path.join(DATA, "main.conf"))
        self.assertEqual(cfg.get("primary_hostname"), "one.example.com")
        self.assertEqual(cfg.get("qualify_domain"), "example.org")

    def test_include_error_location(self):
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "inc.conf"), "w") as f:
            f.write("\n\nbad_option = 1\n")
        path = os.path.join(d, "x.conf")
        with open(path, "w") as f:
            f.write("primary_hostname = a\n.include inc.conf\n")
        exc = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(exc.filename, os.path.join(d, "inc.conf"))
        self.assertEqual(exc.lineno, 3)

    def test_latin1(self):
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "x.conf")
        with open(path, "wb") as f:
            f.write(b"smtp_banner = caf\xe9\n")
        self.assertEqual(load_config(path).get("smtp_banner"), "caf\xe9")


class LineErrorTests(ErrorMixin, unittest.TestCase):
    def test_unterminated_ifdef(self):
        self.assertConfigError(".ifdef FOO\nx = 1\n",
                               "Unexpected end of configuration file: .endif missing", 2)

    def test_endif_without_ifdef(self):
        self.assertConfigError(".endif\n", ".endif without matching .ifdef", 1)

    def test_missing_include(self):
        self.assertConfigError(".include x/y.conf\n",
                               "failed to open included configuration file /etc/x/y.conf", 1)

    def test_include_if_exists_relative(self):
        self.assertConfigError(".include_if_exists x.conf\n",
                               '.include specifies a non-absolute path "x.conf"', 1)

    def test_macro_errors(self):
        self.assertConfigError("ABC = 1\nXABCY = 2\n",
                               '"XABCY" cannot be defined as a macro because previously '
                               'defined macro "ABC" is a substring')
        self.assertConfigError("ABC = 1\nABC = 2\n", 'macro "ABC" is already defined '
                               '(use "==" if you want to redefine it)')
        self.assertConfigError("ABC == 2\n", 'can\'t redefine an undefined macro "ABC"')
        self.assertConfigError("ABC 2\n", "malformed macro definition", 1)

    def test_format(self):
        exc = self.assertConfigError("foo = 1\n", 'main option "foo" unknown', 1)
        self.assertEqual(exc.format(datetime(2026, 12, 1, 8, 0, 0)),
                         "2026-12-01 08:00:00 Exim configuration error in line 1 of "
                         '/etc/x.conf:\n  main option "foo" unknown\n')
        exc = self.assertConfigError("begin routers\nr:\n domains = x\n",
                                     'no driver defined for router "r"')
        self.assertEqual(exc.format(datetime(2026, 12, 1, 8, 0, 0)),
                         "2026-12-01 08:00:00 Exim configuration error:\n"
                         '  no driver defined for router "r"\n')


class OptionTypeTests(ErrorMixin, unittest.TestCase):
    def test_booleans(self):
        cfg = parse("no_accept_8bitmime\nprdr_enable\nnot_message_logs\n"
                    "split_spool_directory = yes\nsyslog_pid = false\n")
        self.assertIs(cfg.get("accept_8bitmime"), False)
        self.assertIs(cfg.get("prdr_enable"), True)
        self.assertIs(cfg.get("message_logs"), False)
        self.assertIs(cfg.get("split_spool_directory"), True)
        self.assertIs(cfg.get("syslog_pid"), False)
        self.assertIs(cfg.get("tcp_nodelay"), True)
        self.assertEqual(cfg.main, {"accept_8bitmime": False, "prdr_enable": True,
                                    "message_logs": False, "split_spool_directory": True,
                                    "syslog_pid": False})

    def test_integers(self):
        cfg = parse("smtp_accept_max = 0x10\nrecipients_max = 010\n"
                    "bounce_return_size_limit = 2M\nmessage_body_visible = 1k\n"
                    "check_spool_space = 20M\nreceived_headers_max = -1\n")
        self.assertEqual(cfg.get("smtp_accept_max"), 16)
        self.assertEqual(cfg.get("recipients_max"), 8)
        self.assertEqual(cfg.get("bounce_return_size_limit"), 2 * 1024 * 1024)
        self.assertEqual(cfg.get("message_body_visible"), 1024)
        self.assertEqual(cfg.get("check_spool_space"), 20 * 1024)  # held in K
        self.assertEqual(cfg.get("received_headers_max"), -1)

    def test_fixed_and_time(self):
        cfg = parse("queue_only_load = 1.25\nauto_thaw = 1h30m\n"
                    "delay_warning = 1h:2h:1d\nsmtp_receive_timeout = ${if x{1m}}\n")
        self.assertEqual(cfg.get("queue_only_load"), 1250)
        self.assertEqual(cfg.get("auto_thaw"), 5400)
        self.assertEqual(cfg.get("delay_warning"), (3600, 7200, 86400))
        self.assertEqual(cfg.get("smtp_receive_timeout"), "${if x{1m}}")
        self.assertEqual(cfg.get("proxy_protocol_timeout"), 3)

    def test_strings(self):
        cfg = parse('smtp_banner = "a\\tb\\n\\x41\\101\\\\ \\$"\n'
                    "primary_hostname = rest of \"line\"\n")
        self.assertEqual(cfg.get("smtp_banner"), "a\tb\nAA\\ $")
        self.assertEqual(cfg.get("primary_hostname"), 'rest of "line"')
        self.assertEqual(cfg.get("dsn_from"),
                         "Mail Delivery System <Mailer-Daemon@$qualify_domain>")

    def test_uids_and_hide(self):
        cfg = parse("exim_user = root\nexim_group = 0\nnever_users = root : 0\n"
                    "hide mysql_servers = x/y/z\n")
        self.assertEqual(cfg.get("exim_user"), 0)
        self.assertEqual(cfg.get("exim_group"), 0)
        self.assertEqual(cfg.get("never_users"), (0, 0))
        self.assertIn("mysql_servers", cfg.hidden)

    def test_old_names(self):
        cfg = parse("proxy_required_hosts = 10.0.0.1\n")
        self.assertEqual(cfg.get("hosts_proxy"), "10.0.0.1")

    def test_experimental_defaults(self):
        cfg = parse("")
        self.assertEqual(cfg.get("spf_guess"), "v=spf1 a/24 mx/24 ptr ?all")
        self.assertEqual(cfg.get("spf_smtp_comment_template"),
                         "Please%_see%_http://www.open-spf.org/Why")
        self.assertEqual(cfg.get("dccifd_address"), "/usr/local/dcc/var/dccifd")
        self.assertEqual(cfg.get("acl_smtp_data_prdr"), "accept")
        self.assertIsNone(cfg.get("redis_servers"))
        self.assertIs(cfg.get("prdr_enable"), False)

    def test_option_errors(self):
        self.assertConfigError("smtp_accept_max = 12x\n",
                               "extra characters follow integer value for smtp_accept_max", 1)
        self.assertConfigError("auto_thaw = 90\n", "invalid time value for auto_thaw", 1)
        self.assertConfigError("accept_8bitmime = maybe\n",
                               '"maybe" is not a valid value for the "accept_8bitmime" option', 1)
        self.assertConfigError("accept_8bitmime 1\n",
                               "extra characters follow boolean option accept_8bitmime", 1)
        self.assertConfigError("primary_hostname foo\n", 'missing "=" after primary_hostname', 1)
        self.assertConfigError("no_primary_hostname\n",
                               "negation prefix applied to a non-boolean option", 1)
        self.assertConfigError("smtp_accept_max = 1\nsmtp_accept_max = 2\n",
                               '"smtp_accept_max" option set for the second time', 2)
        self.assertConfigError("queue_only_load = x\n",
                               "fixed-point number expected for queue_only_load", 1)
        self.assertConfigError("begin\n", 'main option "begin" unknown', 1)
        self.assertConfigError("begin foo\n", '"foo" is not a known configuration section name', 1)
        self.assertConfigError("begin rewrite\nbegin rewrite\n",
                               '"rewrite" section is repeated in the configuration file', 2)
        self.assertConfigError('smtp_banner = "abc\n',
                               "missing quote at end of string value for smtp_banner", 1)


class NamedListTests(ErrorMixin, unittest.TestCase):
    def test_lists(self):
        cfg = parse("domainlist local_domains = @ : example.com\n"
                    "hide hostlist relay = 127.0.0.1\n"
                    "addresslist_cache bad = a@b\nlocalpartlist lp = x\n")
        nl = cfg.named_lists["domain"]["local_domains"]
        self.assertEqual((nl.kind, nl.text, nl.hide, nl.cache, nl.lineno),
                         ("domain", "@ : example.com", False, False, 1))
        self.assertTrue(cfg.named_lists["host"]["relay"].hide)
        self.assertTrue(cfg.named_lists["address"]["bad"].cache)
        self.assertEqual(cfg.named_lists["localpart"]["lp"].text, "x")

    def test_duplicate(self):
        self.assertConfigError("domainlist a = x\ndomainlist a = y\n",
                               'duplicate name "a" for a named domain list', 2)


class DriverTests(ErrorMixin, unittest.TestCase):
    def test_tables(self):
        cfg = parse("begin routers\nr1:\n  domains = x\n  driver = dnslookup\n"
                    "  no_more\n  widen_domains = a:b\nbegin transports\n"
                    "t1:\n  driver = smtp\n  hosts_try_prdr = *.example\n  port = 2525\n"
                    "t2:\n  driver = appendfile\n  file = /x\n  mode = 0640\n"
                    "begin authenticators\nplain:\n  driver = plaintext\n"
                    "  public_name = PLAIN\n  server_prompts = :\n")
        r1 = cfg.routers[0]
        self.assertEqual((r1.name, r1.driver, r1.lineno), ("r1", "dnslookup", 2))
        self.assertIs(r1.get("more"), False)
        self.assertIs(r1.get("qualify_single"), True)
        self.assertEqual(r1.get("self"), "freeze")
        t1, t2 = cfg.transports
        self.assertEqual(t1.get("hosts_try_prdr"), "*.example")
        self.assertEqual(t1.get("hosts_request_ocsp"), "*")
        self.assertEqual(t1.get("tls_verify_cert_hostnames"), "*")
        self.assertEqual(t1.get("data_timeout"), 300)
        self.assertEqual(t2.get("mode"), 0o640)
        self.assertIs(t2.get("retry_use_local_part"), True)
        self.assertIs(t1.get("retry_use_local_part"), False)
        self.assertEqual(cfg.authenticators[0].get("public_name"), "PLAIN")

    def test_repeated_options(self):
        cfg = parse("begin routers\nr:\n driver = accept\n condition = a\n condition = b\n"
                    " headers_add = X: 1\n headers_add = Y: 2\n")
        r = cfg.routers[0]
        self.assertEqual(r.get("condition"), "${if and{{bool_lax{a}}{bool_lax{b}}}}")
        self.assertEqual(r.get("headers_add"), "X: 1\nY: 2")

    def test_macros_between_drivers(self):
        cfg = parse("begin transports\nt:\n driver = pipe\n command = /bin/true\n"
                    "CMD = /bin/false\nu:\n driver = pipe\n command = CMD\n")
        self.assertEqual(cfg.transports[1].get("command"), "/bin/false")

    def test_driver_errors(self):
        self.assertConfigError("begin routers\nr:\n driver = nosuch\n",
                               'router r: cannot find router driver "nosuch"', 3)
        self.assertConfigError("begin routers\nr:\n data = x\n driver = redirect\n",
                               'option "data" unknown ("driver" must be specified before '
                               'any private options)', 3)
        self.assertConfigError("begin routers\nr:\n driver = redirect\nr:\n driver = accept\n",
                               'there are two routers called "r"')
        self.assertConfigError("begin routers\n driver = accept\n", "router name missing", 2)
        self.assertConfigError("begin routers\nr:\n driver = redirect\n foo = 1\n",
                               'option "foo" unknown', 4)
        self.assertConfigError("begin transports\nt:\n driver = appendfile\n mode = 0899\n",
                               "extra characters follow octal integer value for mode", 4)


class AclTests(ErrorMixin, unittest.TestCase):
    def test_statements(self):
        cfg = parse("begin acl\nrcpt:\n  accept  domains = example.com\n"
                    "          message = m\n          endpass\n"
                    "          !local_parts = ^[a-m]\n"
                    "  deny !authenticated = *\n  warn set acl_m_x = 1\n  require\n")
        acl = cfg.acls["rcpt"]
        self.assertEqual([s.verb for s in acl.statements], ["accept", "deny", "warn", "require"])
        items = acl.statements[0].items
        self.assertEqual([(i.name, i.value, i.negated) for i in items],
                         [("domains", "example.com", False), ("message", "m", False),
                          ("endpass", "", False), ("local_parts", "^[a-m]", True)])
        self.assertEqual(items[3].lineno, 6)
        self.assertEqual(acl.statements[1].items[0].negated, True)
        self.assertEqual(acl.statements[2].items[0].value, "acl_m_x = 1")
        self.assertEqual(acl.statements[3].items, [])

    def test_errors(self):
        self.assertConfigError("begin acl\na:\n accept foo = 1\n",
                               'error in ACL: unknown ACL condition/modifier in "accept foo = 1"', 3)
        self.assertConfigError("begin acl\na:\n allow hosts = 1\n",
                               'error in ACL: unknown ACL verb "allow" in "allow hosts = 1"', 3)
        self.assertConfigError("begin acl\na:\n deny !message = x\n",
                               'error in ACL: ACL error: negation is not allowed with "message"', 3)
        self.assertConfigError("begin acl\na:\n deny endpass\n",
                               'error in ACL: ACL error: "endpass" is not allowed with "deny"', 3)
        self.assertConfigError("begin acl\na:\n deny hosts\n",
                               'error in ACL: "=" missing after ACL "hosts" condition', 3)
        self.assertConfigError("begin acl\n deny\n", "missing or malformed ACL name", 2)

    def test_retry_and_rewrite(self):
        cfg = parse("begin retry\n*  rcpt_4xx  senders=:  F,1h,30m\n"
                    "*  *  F,2h,15m; G,16h,1h,1.5\nbegin rewrite\n"
                    "*@old.example  $1@new.example  Ffr\n")
        r = cfg.retry_rules
        self.assertEqual((r[0].pattern, r[0].error, r[0].senders, r[0].params),
                         ("*", "rcpt_4xx", ":", "F,1h,30m"))
        self.assertEqual(r[1].params, "F,2h,15m; G,16h,1h,1.5")
        w = cfg.rewrite_rules[0]
        self.assertEqual((w.pattern, w.replacement, w.flags, w.lineno),
                         ("*@old.example", "$1@new.example", "Ffr", 5))


class DisplayTests(unittest.TestCase):
    def test_format_option(self):
        cfg = parse("primary_hostname = mail.example.com\nauto_thaw = 90m\n"
                    "hide tls_privatekey = /k\nno_tcp_nodelay\nqueue_only_load = 2.5\n"
                    "bounce_return_size_limit = 2048\nsmtp_banner = \"a\\tb\"\n")
        self.assertEqual(format_option(cfg, "primary_hostname"),
                         ("primary_hostname = mail.example.com\n", True))
        self.assertEqual(format_option(cfg, "auto_thaw")[0], "auto_thaw = 1h30m\n")
        self.assertEqual(format_option(cfg, "tcp_nodelay")[0], "no_tcp_nodelay\n")
        self.assertEqual(format_option(cfg, "queue_only_load")[0], "queue_only_load = 2.5\n")
        self.assertEqual(format_option(cfg, "smtp_load_reserve")[0], "smtp_load_reserve =\n")
        self.assertEqual(format_option(cfg, "bounce_return_size_limit")[0],
                         "bounce_return_size_limit = 2K\n")
        self.assertEqual(format_option(cfg, "smtp_banner")[0], "smtp_banner = a\\tb\n")
        self.assertEqual(format_option(cfg, "tls_privatekey")[0], "tls_privatekey = /k\n")
        self.assertEqual(format_option(cfg, "tls_privatekey", admin=False)[0],
                         "tls_privatekey = <value not displayable>\n")
        self.assertEqual(format_option(cfg, "nosuch"), ("nosuch is not a known option\n", False))
        self.assertEqual(format_option(cfg, "check_spool_space")[0], "check_spool_space = 10M\n")
        self.assertEqual(format_option(cfg, "acl_smtp_rcpt")[0], "acl_smtp_rcpt = \n")
        self.assertIn("\nspf_guess = v=spf1 a/24 mx/24 ptr ?all\n", format_all_options(cfg))

    def test_drivers_and_lists(self):
        cfg = parse("domainlist d = a : b\nbegin routers\nr:\n driver = accept\n"
                    " transport = t\n")
        out, ok = format_option(cfg, "router r")
        self.assertTrue(ok)
        self.assertIn("driver = accept\n", out)
        self.assertIn("\ntransport = t\n", out)
        self.assertEqual(format_option(cfg, "router_list")[0], "r\n")
        self.assertEqual(format_option(cfg, "router x"), ("router x not found\n", False))
        self.assertEqual(format_option(cfg, "+d")[0], "domainlist d = a : b\n")


class CorpusTests(unittest.TestCase):
    def test_spec_examples(self):
        cfg = load_config(os.path.join(DATA, "spec-examples.conf"))
        self.assertEqual(cfg.get("redis_servers"), "127.0.0.1//")
        self.assertEqual(cfg.named_lists["host"]["relay_from_ips"].text,
                         "<\\n ${lookup redis{SMEMBERS relay_from_ips}}")
        self.assertEqual(cfg.named_lists["domain"]["virtual_domains"].text,
                         "${lookup redis {HGET $domain domain}}")
        self.assertEqual(cfg.get("hosts_proxy"), "127.0.0.1")
        spf = cfg.acls["check_rcpt"].statements[0].items
        self.assertEqual((spf[0].name, spf[0].value), ("spf", "fail"))
        self.assertIn("Please see http://www.open-spf.org/Why", spf[1].value)
        dmarc = cfg.acls["check_data"].statements[0].items
        self.assertEqual([i.name for i in dmarc],
                         ["dmarc_status", "domains", "log_message", "add_header"])
        self.assertTrue(dmarc[1].negated)
        smtp = cfg.transports[0]
        self.assertEqual(smtp.get("event_action"), "${if eq{msg:delivery}{$tpda_event}{x}}")
        self.assertEqual(smtp.get("socks_proxy"), "127.0.0.1 port=1080")

    def test_reference_corpora(self):
        data = os.path.join(os.path.dirname(__file__), "data")
        paths = [os.path.join(data, "expand-corpus", "exim.conf")]
        paths += sorted(glob.glob(os.path.join(data, "acl-corpus", "*", "exim.conf")))
        for path in paths:
            cfg = load_config(path)
            self.assertTrue(cfg.routers, path)
        cfg = load_config(paths[0])
        self.assertEqual(cfg.get("perl_startup"), "do '/EXPCORPUS/startup.pl'")
        self.assertEqual(cfg.macros["MACRO_WITH_EXPANSION"], "${uc:inner}")

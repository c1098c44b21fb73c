"""Reading a whole configuration: main options, named lists, macros and the
``begin`` sections (readconf.c ``readconf_main()``/``readconf_rest()``,
acl.c ``acl_read()``)."""

from __future__ import annotations

import functools
import re

from twisted_mta.config import optiontables
from twisted_mta.config.errors import ConfigError
from twisted_mta.config.model import (
    DRIVER_TABLES,
    Acl,
    AclItem,
    AclStatement,
    Config,
    DriverInstance,
    NamedList,
    RetryRule,
    RewriteRule,
)
from twisted_mta.config.options import (
    MAIN_ALIASES,
    TRANSPORT_ALIASES,
    WHITESPACE,
    OptionError,
    dequote,
    handle_option,
)
from twisted_mta.config.reader import LineReader, Macros

ACL_VERBS = ("accept", "defer", "deny", "discard", "drop", "require", "warn")
# Conditions and modifiers (True = modifier, which cannot be negated).
# demime and prvscheck are not in 4.96; they are kept so that older
# configurations written for the experimental features still load.
ACL_CONDITIONS = {
    "acl": False, "add_header": True, "authenticated": False, "bmi_optin": True,
    "condition": False, "continue": True, "control": True, "dcc": False,
    "decode": False, "delay": True, "demime": False, "dkim_signers": False,
    "dkim_status": False, "dmarc_status": False, "dnslists": False,
    "domains": False, "encrypted": False, "endpass": True, "hosts": False,
    "local_parts": False, "log_message": True, "log_reject_target": True,
    "logwrite": True, "malware": False, "message": True, "mime_regex": False,
    "prvscheck": False, "queue": True, "ratelimit": False, "recipients": False,
    "regex": False, "remove_header": True, "seen": False, "sender_domains": False,
    "senders": False, "set": True, "spam": False, "spf": False, "spf_guess": False,
    "udpsend": True, "verify": False,
}
# Compiled-in features announced as _HAVE_ macros.
FEATURES = (
    "CRYPTEQ", "ICONV", "IPV6", "PAM", "PERL", "DLFUNC", "TLS", "GNUTLS",
    "MOVE_FROZEN_MESSAGES", "CONTENT_SCANNING", "DKIM", "DNSSEC", "EVENT",
    "I18N", "OCSP", "PIPE_CONNECT", "PRDR", "PROXY", "SOCKS", "SPF", "SRS",
    "NATIVE_SRS", "DMARC", "DANE", "DCC", "REDIS", "TLS_RESUME", "TCP_FASTOPEN",
    "LOOKUP_LSEARCH", "LOOKUP_CDB", "LOOKUP_DBM", "LOOKUP_DNSDB",
    "LOOKUP_DSEARCH", "LOOKUP_REDIS",
)
_SECTIONS = ("acls", "authenticators", "local_scans", "retrys", "rewrites", "routers", "transports")
_LIST_KINDS = (("domainlist", "domain"), ("hostlist", "host"),
               ("addresslist", "address"), ("localpartlist", "localpart"))
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_DRIVER_START = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*(:|=)?")


@functools.cache
def builtin_macros() -> dict[str, str]:
    """The ``_HAVE_*``, ``_DRIVER_*``, ``_OPT_*`` and ``_ACL_*`` macros."""
    macros = {f"_HAVE_{name}": "y" for name in FEATURES}
    for kind, (generic, drivers) in DRIVER_TABLES.items():
        plural = kind.upper() + "S"
        for driver in drivers:
            macros[f"_DRIVER_{kind.upper()}_{driver.upper()}"] = "y"
        for option in generic:
            macros[f"_OPT_{plural}_{option.upper()}"] = "y"
        for driver, (private, _) in drivers.items():
            for option in private:
                macros[f"_OPT_{kind.upper()}_{driver.upper()}_{option.upper()}"] = "y"
    for option in optiontables.MAIN:
        macros[f"_OPT_MAIN_{option.upper()}"] = "y"
    for name, modifier in ACL_CONDITIONS.items():
        macros[f"_ACL_{'MOD' if modifier else 'COND'}_{name.upper()}"] = "y"
    return macros


def _error(reader: LineReader, exc: OptionError) -> ConfigError:
    return reader.error(str(exc))


class _Parser:
    def __init__(self, text: str, filename: str, defines: dict[str, str] | None) -> None:
        macros = Macros(builtin_macros(), defines)
        self.reader = LineReader(text, filename, macros)
        self.config = Config(filename, macros)
        self.section: str | None = None

    def run(self) -> Config:
        self._main()
        seen: set[str] = set()
        while self.section is not None:
            raw = self.section
            name = raw if raw[-1:].lower() == "s" else raw + "s"
            if name.lower() not in _SECTIONS:
                raise self.reader.error(f'"{raw}" is not a known configuration section name')
            name = name.lower()
            if name in seen:
                raise self.reader.error(f'"{raw}" section is repeated in the configuration file')
            seen.add(name)
            self.section = None
            if name == "acls":
                self._acls()
            elif name == "retrys":
                self._rules(self._retry)
            elif name == "rewrites":
                self._rules(self._rewrite)
            elif name == "local_scans":
                raise self.reader.error(
                    "local_scan() options not supported: (LOCAL_SCAN_HAS_OPTIONS not "
                    "defined in Local/Makefile)")
            else:
                self._drivers(name[:-1])
        return self.config

    def _lines(self):
        """Logical lines of the current section; stops at ``begin``."""
        for line in self.reader:
            if line[:6].lower() == "begin ":
                self.section = line[6:].lstrip(WHITESPACE)
                return
            yield line

    def _main(self) -> None:
        cfg = self.config
        for line in self._lines():
            if "A" <= line[0] <= "Z":
                cfg.macro_table.define(line, self.reader)
                continue
            hide = line.startswith("hide") and line[4:5] in (" ", "\t")
            body = line[5:].lstrip(WHITESPACE) if hide else line
            for word, kind in _LIST_KINDS:
                if body.startswith(word):
                    self._named_list(body[len(word):], kind, hide)
                    break
            else:
                try:
                    handle_option(line, optiontables.MAIN, MAIN_ALIASES, cfg.main,
                                  cfg.hidden, 'main option "%s" unknown')
                except OptionError as exc:
                    raise _error(self.reader, exc) from None

    def _named_list(self, text: str, kind: str, hide: bool) -> None:
        cache = text.startswith("_cache")
        if cache:
            text = text[6:]
        if not text[:1] or text[0] not in WHITESPACE:
            raise self.reader.error("unrecognized configuration line")
        text = text.lstrip(WHITESPACE)
        name = re.match(r"[A-Za-z0-9_]*", text).group()
        text = text[len(name):].lstrip(WHITESPACE)
        lists = self.config.named_lists[kind]
        if name in lists:
            label = "local part" if kind == "localpart" else kind
            raise self.reader.error(f'duplicate name "{name}" for a named {label} list')
        if not text.startswith("="):
            raise self.reader.error(f"missing '=' after \"{name}\"")
        value = text[1:].lstrip(WHITESPACE)
        if value.startswith('"'):
            value, rest = dequote(value)
            if rest:
                raise self.reader.error(f"extra characters follow string value for {name}")
        lists[name] = NamedList(name, kind, value, hide, cache,
                                self.reader.filename, self.reader.lineno)

    def _drivers(self, kind: str) -> None:
        generic, drivers = DRIVER_TABLES[kind]
        aliases = TRANSPORT_ALIASES if kind == "transport" else {}
        instances: list[DriverInstance] = getattr(self.config, kind + "s")
        current: DriverInstance | None = None
        for line in self._lines():
            m = _DRIVER_START.match(line)
            if m and m.group(2) == "=" and "A" <= line[0] <= "Z":
                self._finish(current)
                current = None
                self.config.macro_table.define(line, self.reader)
                continue
            if m and m.group(2) == ":":
                self._finish(current)
                name = m.group(1)
                if line[m.end():].strip(WHITESPACE):
                    raise self.reader.error(
                        f"extra characters follow driver name {name}")
                if any(d.name == name for d in instances):
                    raise ConfigError(f'there are two {kind}s called "{name}"')
                current = DriverInstance(kind, name, filename=self.reader.filename,
                                         lineno=self.reader.lineno)
                instances.append(current)
                continue
            if current is None:
                raise self.reader.error(f"{kind} name missing")
            try:
                if handle_option(line, generic, aliases, current.options, current.hidden, None):
                    if current.driver is None and "driver" in current.options:
                        current.driver = current.options["driver"]
                        if current.driver not in drivers:
                            raise self.reader.error(
                                f'{kind} {current.name}: cannot find {kind} driver "{current.driver}"')
                elif current.driver is not None:
                    handle_option(line, drivers[current.driver][0], {}, current.options,
                                  current.hidden, 'option "%s" unknown')
                else:
                    name = _NAME.match(line.lstrip(WHITESPACE))
                    raise self.reader.error(
                        f'option "{name.group() if name else ""}" unknown '
                        '("driver" must be specified before any private options)')
            except OptionError as exc:
                raise _error(self.reader, exc) from None
        self._finish(current)

    @staticmethod
    def _finish(instance: DriverInstance | None) -> None:
        if instance is not None and instance.driver is None:
            raise ConfigError(f'no driver defined for {instance.kind} "{instance.name}"')

    def _acls(self) -> None:
        acl: Acl | None = None
        statement: AclStatement | None = None
        for line in self._lines():
            text = line
            negated = text.startswith("!")
            if negated:
                text = text[1:].lstrip(WHITESPACE)
            m = _NAME.match(text)
            name = m.group() if m else ""
            rest = text[len(name):].lstrip(WHITESPACE)
            if not negated and "A" <= name[:1] <= "Z" and rest.startswith("="):
                self.config.macro_table.define(line, self.reader)
                acl = statement = None
                continue
            if not negated and rest.startswith(":"):
                if name in self.config.acls:
                    raise self.reader.error(f'there are two ACLs called "{name}"')
                acl = self.config.acls[name] = Acl(name)
                statement = None
                continue
            if acl is None:
                raise self.reader.error("missing or malformed ACL name")
            if name in ACL_VERBS:
                if negated:
                    raise self.reader.error(f'error in ACL: malformed ACL line "{line}"')
                statement = AclStatement(name, filename=self.reader.filename,
                                         lineno=self.reader.lineno)
                acl.statements.append(statement)
                if not rest:
                    continue
                negated = rest.startswith("!")
                if negated:
                    rest = rest[1:]
                m = _NAME.match(rest.lstrip(WHITESPACE))
                name = m.group() if m else ""
                rest = rest.lstrip(WHITESPACE)[len(name):].lstrip(WHITESPACE)
            elif statement is None:
                raise self.reader.error(f'error in ACL: unknown ACL verb "{name}" in "{line}"')
            self._acl_item(statement, name, rest, negated, line)

    def _acl_item(self, statement: AclStatement, name: str, rest: str,
                  negated: bool, line: str) -> None:
        modifier = ACL_CONDITIONS.get(name)
        if modifier is None:
            raise self.reader.error(f'error in ACL: unknown ACL condition/modifier in "{line}"')
        if negated and modifier:
            raise self.reader.error(
                f'error in ACL: ACL error: negation is not allowed with "{name}"')
        if name == "endpass":
            if statement.verb not in ("accept", "discard"):
                raise self.reader.error(
                    f'error in ACL: ACL error: "endpass" is not allowed with "{statement.verb}"')
            value = ""
        else:
            if name == "set":
                rest = self._acl_set_name(rest)
            if not rest.startswith("="):
                what = "modifier" if modifier else "condition"
                raise self.reader.error(f'error in ACL: "=" missing after ACL "{name}" {what}')
            value = rest[1:].lstrip(WHITESPACE)
            if name == "set":
                value = f"{self._set_var} = {value}"
        statement.items.append(AclItem(name, value, negated, self.reader.filename,
                                       self.reader.lineno))

    def _acl_set_name(self, rest: str) -> str:
        """Check the variable after ``set``; keep it and return the rest."""
        m = re.match(r"dkim_verify_(status|reason)(?![A-Za-z0-9])", rest)
        if m:
            self._set_var = m.group()
            return rest[m.end():].lstrip(WHITESPACE)
        if not rest.startswith(("acl_c", "acl_m")):
            raise self.reader.error(
                f'error in ACL: invalid variable name after "set" in ACL modifier '
                f'"set {rest}" (must start "acl_c" or "acl_m")')
        if not (rest[5:6].isdigit() or rest[5:6] == "_"):
            raise self.reader.error(
                f'error in ACL: invalid variable name after "set" in ACL modifier '
                f'"set {rest}" (digit or underscore must follow acl_c or acl_m)')
        end = 5
        while end < len(rest) and rest[end] != "=" and rest[end] not in WHITESPACE:
            if not (rest[end].isalnum() or rest[end] == "_"):
                raise self.reader.error(
                    f'error in ACL: invalid character "{rest[end]}" in variable name '
                    f'in ACL modifier "set {rest}"')
            end += 1
        self._set_var = rest[:end]
        return rest[end:].lstrip(WHITESPACE)

    def _rules(self, handler) -> None:
        for line in self._lines():
            handler(line)

    def _retry(self, line: str) -> None:
        pattern, rest = _word(line)
        error, rest = _word(rest)
        senders = None
        if rest.startswith("senders"):
            m = re.match(r"senders[ \t]*=[ \t]*", rest)
            if m is None:
                raise self.reader.error('"=" expected after "senders" in retry rule')
            senders, rest = _word(rest[m.end():])
        self.config.retry_rules.append(
            RetryRule(pattern, error, senders, rest, self.reader.lineno))

    def _rewrite(self, line: str) -> None:
        pattern, rest = _word(line)
        if not rest:
            raise self.reader.error("missing rewrite replacement string")
        replacement, rest = _word(rest)
        flags = rest.replace(" ", "").replace("\t", "")
        for flag in flags:
            if flag not in "qwhsftcbrEFTQRS":
                raise self.reader.error(
                    f"unknown rewrite flag character '{flag}' (could be missing "
                    "quotes round replacement item)")
            if flag == "S" and not pattern.startswith(("^", "\\N^")):
                raise self.reader.error(
                    "rewrite rule has the S flag but is not a regular expression")
        self.config.rewrite_rules.append(
            RewriteRule(pattern, replacement, flags, self.reader.lineno))


def _word(text: str) -> tuple[str, str]:
    """A possibly quoted word and the rest, as Exim's ``string_dequote()``."""
    if text.startswith('"'):
        value, rest = dequote(text)
    else:
        end = 0
        while end < len(text) and text[end] not in WHITESPACE:
            end += 1
        value, rest = text[:end], text[end:]
    return value, rest.lstrip(WHITESPACE)


def parse_config_text(text: str, filename: str = "<string>",
                      defines: dict[str, str] | None = None) -> Config:
    """Parse configuration *text* as if read from *filename*."""
    return _Parser(text, filename, defines).run()


def parse_acl_text(text: str, name: str, macros: Macros | None = None,
                   filename: str = "<inline ACL>") -> Acl:
    """An ACL given inline in an ``acl_smtp_*`` option (or read from a file
    named there): the statements of *text*, newline-separated, as if they
    followed ``name:`` in the ACL section.  Raises ConfigError."""
    parser = _Parser("", filename, None)
    if macros is not None:
        parser.config.macro_table = macros
    parser.reader = LineReader(f"{name}:\n{text}", filename, parser.config.macro_table)
    parser._acls()
    return parser.config.acls[name]


def load_config(path: str, defines: dict[str, str] | None = None) -> Config:
    """Read and parse the configuration file at *path* (Latin-1)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("latin-1")
    except OSError as exc:
        raise ConfigError(f"failed to open configuration file {path}: {exc.strerror}") from None
    config = parse_config_text(text, path, defines)
    # Exim reads the retry rules with the file, so a bad one stops it here.
    from twisted_mta.queue.retry import RetryRules

    RetryRules(config)
    return config


"""``exim -bP`` output (readconf.c ``readconf_print()``)."""

from __future__ import annotations

from twisted_mta.config import optiontables
from twisted_mta.config.model import DRIVER_TABLES, Config, DriverInstance
from twisted_mta.config.options import HIDDEN_TEXT, MAIN_ALIASES, format_value

_LIST_LABELS = (("address", "address"), ("domain", "domain"), ("host", "host"),
                ("localpart", "localpart"))
_DRIVER_KINDS = {"router": "routers", "transport": "transports",
                 "authenticator": "authenticators"}


def _main_line(cfg: Config, name: str, admin: bool) -> str:
    typ = optiontables.MAIN[name][0]
    return format_value(name, typ, cfg.get(name), hide=not admin and name in cfg.hidden)


def format_driver(instance: DriverInstance, admin: bool = True) -> str:
    """The options of one driver instance, one per line, as ``-bP router x``."""
    generic, drivers = DRIVER_TABLES[instance.kind]
    private = drivers[instance.driver][0] if instance.driver in drivers else {}
    lines = []
    for table in (generic, private):
        for name, (typ, _, flags) in table.items():
            if "h" in flags:
                continue
            lines.append(format_value(name, typ, instance.get(name),
                                      hide=not admin and name in instance.hidden))
    return "\n".join(lines) + "\n"


def format_all_options(cfg: Config, admin: bool = True) -> str:
    """``exim -bP`` with no names: every visible main option."""
    return "".join(_main_line(cfg, name, admin) + "\n"
                   for name, (_, _, flags) in optiontables.MAIN.items() if "h" not in flags)


def format_option(cfg: Config, name: str, admin: bool = True) -> tuple[str, bool]:
    """``exim -bP name`` output and whether it succeeded (exit code 0).

    Handles main options, ``+listname``, ``config_file``, ``all``, the
    ``routers``/``transports``/``authenticators`` listings, their ``_list``
    forms, ``macros``/``macro_list``, and ``router NAME`` style pairs."""
    kind, _, rest = name.partition(" ")
    if kind in _DRIVER_KINDS and rest:
        for instance in getattr(cfg, _DRIVER_KINDS[kind]):
            if instance.name == rest:
                return format_driver(instance, admin), True
        return f"{kind} {rest} not found\n", False
    if name.startswith("+"):
        out = []
        for kind, label in _LIST_LABELS:
            nl = cfg.named_lists[kind].get(name[1:])
            if nl is not None:
                out.append(f"{label}list {nl.name} = {HIDDEN_TEXT if nl.hide else nl.text}\n")
        if not out:
            return (f'no address, domain, host, or local part list called "{name[1:]}" '
                    "exists\n"), False
        return "".join(out), True
    if name in ("config_file", "configure_file"):
        return cfg.filename + "\n", True
    if name == "all":
        return format_all_options(cfg, admin), True
    for kind, plural in _DRIVER_KINDS.items():
        if name == plural:
            return "".join(f"\n{d.name} {kind}:\n" + format_driver(d, admin)
                           for d in getattr(cfg, plural)), True
        if name == f"{kind}_list":
            return "".join(d.name + "\n" for d in getattr(cfg, plural)), True
    if name == "macros":
        return "".join(f"{k}={v}\n" for k, v in cfg.macros.items()), True
    if name == "macro_list":
        return "".join(k + "\n" for k in cfg.macros), True
    if kind == "macro" and rest:
        if rest in cfg.macros:
            return f"{rest}={cfg.macros[rest]}\n", True
        return f"macro {rest} not found\n", False
    key = MAIN_ALIASES.get(name, name)
    if key not in optiontables.MAIN:
        return f"{name} is not a known option\n", False
    return _main_line(cfg, key, admin).replace(key, name, 1) + "\n", True

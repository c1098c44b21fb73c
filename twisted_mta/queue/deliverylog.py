"""The delivery lines of the main log, as Exim's deliver.c writes them:
``=>`` and ``->`` (delivered), ``**`` (failed), ``==`` (deferred) and
``*>`` (delivery suppressed)."""

from __future__ import annotations

import os
from typing import Any

from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.values import format_time


def log_address(addr: DeliveryAddress, *, success: bool, log_as_local: bool,
                transport_local: bool, all_parents: bool = False) -> str:
    """string_log_address(): the address, its parents in brackets where
    Exim shows them, and the envelope recipient in ``<>``."""
    top = addr.top
    pfr = addr.pipe_command is not None or addr.file_path is not None
    add_top = True
    if pfr or (success and log_as_local and transport_local):
        text = addr.address if pfr else addr.extra.get("routed_local_part", addr.local_part)
    else:
        text = addr.address
        if text.lower() == top.address.lower() and \
                text[:text.find("@")] == top.address[:top.address.find("@")] and \
                (not all_parents or addr.parent is None or addr.parent is top):
            add_top = False
    if (all_parents or pfr) and addr.parent is not None and addr.parent is not top:
        parents = []
        parent = addr.parent
        while parent is not top:
            parents.append(parent.address)
            if not all_parents:
                break
            parent = parent.parent
        text += f" ({', '.join(parents)})"
    if add_top:
        text += f" <{top.address}>"
    return text


def _host_text(addr: DeliveryAddress, selector: frozenset[str]) -> str:
    host = addr.host_used
    if host is None:
        return ""
    text = f" H={host.name}"
    if "dnssec" in selector and host.dnssec:
        text += " DS"
    text += f" [{host.address}]"
    if "outgoing_port" in selector and host.port:
        text += f":{host.port}"
    if addr.extra.get("continued"):
        # A connection another delivery handed on (Exim's continue_sequence > 1).
        text += "*"
    proxy = addr.extra.get("proxy")
    if proxy and "proxy" in selector:  # the SOCKS proxy used (Exim's d_hostlog)
        text += f" PRX=[{proxy[0]}]"
        if "outgoing_port" in selector:
            text += f":{proxy[1]}"
    return text


def _time_text(seconds: float, selector: frozenset[str]) -> str:
    if seconds >= 5 or "millisec" not in selector:
        return format_time(int(seconds))
    return f"{seconds:.3f}s"


def delivery_line(addr: DeliveryAddress, *, logchar: str, sender: str,
                  transport: Any, log_as_local: bool, selector: frozenset[str],
                  queue_time: float | None = None) -> str:
    """``=> addr R=router T=transport ...`` (*logchar* ``=``, ``-`` or
    ``*``)."""
    local = bool(getattr(transport, "local", True))
    text = f"{logchar}> " + log_address(addr, success=True, log_as_local=log_as_local,
                                        transport_local=local,
                                        all_parents="all_parents" in selector)
    text += _sender_and_drivers(addr, sender, selector)
    if "delivery_size" in selector and "size" in addr.extra:
        text += f" S={addr.extra['size']}"
    if local:
        if addr.hosts:
            text += f" H={addr.hosts[0].name}"
    else:
        text += _host_text(addr, selector)
        if addr.extra.get("tls_cipher") and "tls_cipher" in selector:
            text += f" X={addr.extra['tls_cipher']}"
        if addr.extra.get("tls_cipher") and "tls_certificate_verified" in selector:
            text += f" CV={'yes' if addr.extra.get('tls_cv') else 'no'}"
        if addr.extra.get("tls_peerdn") and "tls_peerdn" in selector:
            text += f' DN="{addr.extra["tls_peerdn"]}"'
        if addr.extra.get("authenticator"):
            # deliver.c: after d_tlslog(), the client authenticator's name.
            text += f" A={addr.extra['authenticator']}"
        if "L" in addr.extra.get("flags", ()) and "pipelining" in selector:
            text += " L"      # af_pipelining: the transaction was pipelined
        if "PRDR" in addr.extra.get("flags", ()):
            text += " PRDR"
        if "K" in addr.extra.get("flags", ()):
            # af_chunking_used: sent with BDAT (no log selector needed).
            text += " K"
    if "smtp_confirmation" in selector and addr.confirmation and \
            (addr.host_used is not None or addr.extra.get("lmtp")):
        quoted = addr.confirmation[:1024].replace("\\", "\\\\").replace('"', '\\"')
        text += f' C="{quoted}"'
    if "queue_time" in selector and queue_time is not None:
        text += f" QT={_time_text(queue_time, selector)}"
    text += _deliver_time(addr, selector)
    return text


def _sender_and_drivers(addr: DeliveryAddress, sender: str, selector: frozenset[str]) -> str:
    """`` F=<sender>`` (``+sender_on_delivery``), `` R=router``, `` T=transport``."""
    text = f" F=<{sender}>" if "sender_on_delivery" in selector else ""
    if addr.router:
        text += f" R={addr.router}"
    if addr.transport:
        text += f" T={addr.transport}"
    return text


def _deliver_time(addr: DeliveryAddress, selector: frozenset[str]) -> str:
    if "deliver_time" in selector and "delivery_time" in addr.extra:
        return f" DT={_time_text(addr.extra['delivery_time'], selector)}"
    return ""


def _driver_text(addr: DeliveryAddress, driver_kind: str | None) -> str:
    """The `` R=router`` / `` T=transport`` part of a deferral."""
    if driver_kind == "transport" and addr.transport:
        router = f" R={addr.router}" if addr.router else ""
        return f"{router} T={addr.transport}"
    if driver_kind == "router" and addr.router:
        return f" R={addr.router}"
    if driver_kind == "routing":
        return " routing"
    return ""


def deferral_line(addr: DeliveryAddress, *, driver_kind: str | None,
                  selector: frozenset[str]) -> str:
    """``== addr R=router T=transport defer (errno): ...: message``."""
    text = log_address(addr, success=False, log_as_local=False, transport_local=False,
                       all_parents="all_parents" in selector)
    text += _driver_text(addr, driver_kind)
    text += f" defer ({addr.basic_errno})"
    if addr.basic_errno > 0:
        text += f": {os.strerror(addr.basic_errno)}"
    text += _host_text(addr, selector)
    text += _deliver_time(addr, selector)
    if addr.message:
        text += f": {addr.message}"
    return "== " + text


def failure_line(addr: DeliveryAddress, *, sender: str, selector: frozenset[str]) -> str:
    """``** addr R=router T=transport: message``."""
    text = log_address(addr, success=False, log_as_local=False, transport_local=False,
                       all_parents="all_parents" in selector)
    text += _sender_and_drivers(addr, sender, selector)
    text += _host_text(addr, selector)
    if addr.basic_errno > 0:
        text += f": {os.strerror(addr.basic_errno)}"
    if addr.message:
        text += f": {addr.message}"
    text += _deliver_time(addr, selector)
    return "** " + text

"""The ``redirect`` router: ``data`` or ``file`` expands to a list of new
addresses, pipes, files and special items, as Exim's parse_forward_list()
reads it.  Exim and Sieve filters are not interpreted (see doc/routers.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from twisted_mta.expand.addresses import AddressError, extract_address, find_address_end
from twisted_mta.expand.errors import ForcedFailure
from twisted_mta.interfaces import IRouter
from twisted_mta.queue.address import DeliveryAddress
from twisted_mta.routers.engine import ACCEPT, DECLINE, DEFER, FAIL, RouterResult

_SPECIALS = (":blackhole:", ":fail:", ":defer:", ":freeze:")


class RedirectError(Exception):
    """The redirection data is in error (a defer, as in Exim)."""


@dataclass
class _Special:
    kind: str
    text: str


@implementer(IRouter)
class RedirectRouter:
    name = "redirect"

    async def route(self, instance: Any, address: DeliveryAddress, context: Any
                    ) -> RouterResult:
        source = "data" if instance.get("data") is not None else "file"
        try:
            text = await self._data(instance, context)
        except ForcedFailure:
            return RouterResult(DECLINE)
        except FileNotFoundError:
            return RouterResult(DECLINE)
        except OSError as e:
            return RouterResult(DEFER, f"failed to open {instance.get('file')}: "
                                       f"{e.strerror}")
        if text is None or not _significant(text):
            return RouterResult(DECLINE)
        kind = filter_type(text)
        if kind is not None:
            # exim-py does not interpret filters; Exim defers them too when
            # allow_filter is not set.
            why = "filtering not enabled" if not instance.get("allow_filter") else \
                f"{kind} filtering is not supported by exim-py"
            return RouterResult(DEFER, f"error in filter {source}: {why}")
        try:
            items = await self._items(instance, text, address, context)
        except RedirectError as e:
            return RouterResult(DEFER, f"error in redirect {source}: {e}")
        children: list[DeliveryAddress] = []
        for item in items:
            if isinstance(item, _Special):
                if item.kind == ":blackhole:":
                    # Everything generated so far is discarded with it.
                    return _discard(address)
                if item.kind == ":fail:":
                    return RouterResult(FAIL, item.text or "forced rejection",
                                        pass_message=bool(item.text))
                if item.kind == ":defer:":
                    return RouterResult(DEFER, item.text or "forced defer",
                                        pass_message=bool(item.text))
                if item.kind == ":freeze:":
                    address.special_action = "freeze"
                    return RouterResult(DEFER, item.text or "frozen by filter")
                continue
            children.append(item)
        if not children:
            return _discard(address)
        return RouterResult(ACCEPT, children=children)

    async def _data(self, instance: Any, context: Any) -> str | None:
        ctx = context.ctx
        data = instance.get("data")
        if data is not None:
            return await ctx.expand(str(data))
        path = instance.get("file")
        if path is None:
            return None
        path = await ctx.expand(str(path))
        return await _read_file(ctx, path)

    async def _items(self, instance: Any, text: str, parent: DeliveryAddress,
                     context: Any, depth: int = 0) -> list[Any]:
        """The items of *text*: child addresses and _Special markers."""
        items: list[Any] = []
        for raw in _split_items(text):
            item = raw.strip()
            inquote = len(item) >= 2 and item[0] == '"' and item[-1] == '"'
            if inquote:
                # Quotes that enclose the whole item go (parse_forward_list()).
                item = item[1:-1].strip()
                if item[:1] in ("|", "/"):
                    item = _unescape(item)
            if not item or item == ":unknown:":
                continue
            special = next((s for s in _SPECIALS if item.lower().startswith(s)), None)
            if special is not None:
                if not _permitted(instance, special):
                    raise RedirectError(f'"{item}" is not permitted')
                # The text runs to the end of the data, as in Exim.
                rest = text[text.find(special) + len(special):].strip()
                return items + [_Special(special, rest)]
            if item.lower().startswith(":include:"):
                if instance.get("forbid_include"):
                    raise RedirectError('included file "' + item[9:].strip()
                                        + '" is not permitted')
                if depth > 10:
                    raise RedirectError("too many levels of :include:")
                try:
                    included = await _read_file(context.ctx, item[9:].strip())
                except OSError as e:
                    raise RedirectError(f"failed to open included file "
                                        f"{item[9:].strip()}: {e.strerror}") from None
                items.extend(await self._items(instance, included, parent, context,
                                               depth + 1))
                continue
            if item.startswith("|"):
                if instance.get("forbid_pipe"):
                    raise RedirectError(f'"{item}" is not permitted')
                child = parent.child(item, pipe_command=item[1:].strip())
                child.transport = await _special_transport(instance, context,
                                                           "pipe_transport")
                items.append(child)
                continue
            if item.startswith("/"):
                if instance.get("forbid_file"):
                    raise RedirectError(f'"{item}" is not permitted')
                # Exim: a trailing "/" always means directory_transport.
                option = "directory_transport" if item.endswith("/") else "file_transport"
                child = parent.child(item, file_path=item)
                child.transport = await _special_transport(instance, context, option)
                items.append(child)
                continue
            escaped = item.startswith("\\")
            try:
                found, domain_at = extract_address(item[1:] if escaped else item)
                if escaped and domain_at:
                    # "\user@domain": Exim parses the whole item again, so
                    # the backslash stays in the address (a quoted "\u").
                    found, domain_at = extract_address(item)
            except AddressError as e:
                if instance.get("skip_syntax_errors"):
                    continue
                raise RedirectError(f"{e.args[0]} in \"{item}\"") from None
            if not domain_at:
                # "\user" takes the incoming domain, as qualify_preserve_domain does.
                domain = parent.domain if escaped or instance.get("qualify_preserve_domain") \
                    else (instance.get("qualify_domain") or
                          context.config.get("qualify_recipient"))
                found = f"{found}@{domain}"
            items.append(parent.child(found))
        return items


def _unescape(text: str) -> str:
    """A quoted pipe or file: each backslash takes the next character."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def _match_tag(text: str, tag: str) -> bool:
    """rda.c match_tag(): caseless, a space in *tag* matching any run of
    blanks (or none)."""
    pos = 0
    for char in tag:
        if char == " ":
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            continue
        if pos >= len(text) or text[pos].lower() != char:
            return False
        pos += 1
    return True


def filter_type(text: str) -> str | None:
    """"Exim" or "Sieve" when the redirection data is a filter program
    (rda_is_filter()), else None."""
    stripped = text.lstrip(" \t\n\r\f\v")
    if _match_tag(stripped, "# exim filter"):
        return "Exim"
    if _match_tag(stripped, "# sieve filter"):
        return "Sieve"
    return None


def _discard(address: DeliveryAddress) -> RouterResult:
    return RouterResult(ACCEPT, children=[address.child(address.address,
                                                        discarded=":blackhole:")])


def _significant(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#")
               for line in text.split("\n"))


def _split_items(text: str) -> list[str]:
    """Comma- or newline-separated items; ``#`` lines are comments; commas
    inside quotes, comments and route-addrs do not split."""
    lines = [line for line in text.split("\n") if not line.lstrip().startswith("#")]
    joined = "\n".join(lines)
    items: list[str] = []
    pos = 0
    while pos < len(joined):
        if joined[pos] in ", \t\n":
            pos += 1
            continue
        stripped = joined[pos:]
        if stripped[:1] in "|/" or stripped[:2] in ('"|', '"/'):
            # A pipe or file runs to the end of the line (or its quote).
            if stripped[0] == '"':
                close = _closing_quote(stripped)
                end = pos + (close + 1 if close >= 0 else len(stripped))
            else:
                newline = stripped.find("\n")
                comma = stripped.find(",")
                ends = [e for e in (newline, comma) if e >= 0]
                end = pos + (min(ends) if ends else len(stripped))
            items.append(joined[pos:end])
            pos = end
            continue
        if stripped.lower().startswith(_SPECIALS):
            items.append(stripped)
            break
        end = find_address_end(joined, pos)
        newline = joined.find("\n", pos)
        if 0 <= newline < end:
            end = newline
        items.append(joined[pos:end])
        pos = end + 1
    return items


def _closing_quote(text: str) -> int:
    """Where the quoted item starting at text[0] ends; a backslash escapes
    the character after it (``"|/bin/sh -c \\"cat > x\\""``)."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def _permitted(instance: Any, special: str) -> bool:
    if special == ":blackhole:":
        return not instance.get("forbid_blackhole")
    option = {":fail:": "allow_fail", ":defer:": "allow_defer",
              ":freeze:": "allow_freeze"}[special]
    return bool(instance.get(option))


async def _special_transport(instance: Any, context: Any, option: str) -> str | None:
    name = instance.get(option)
    if name is None:
        return None
    return await context.ctx.expand(str(name))


async def _read_file(ctx: Any, path: str) -> str:
    """The file's text, read in the thread pool when there is one (a
    forward file may sit on a slow disk)."""
    def read() -> str:
        with open(path, encoding="latin-1") as f:
            return f.read()

    threadpool = getattr(ctx, "threadpool", None)
    reactor = getattr(ctx, "reactor", None)
    if threadpool is not None and reactor is not None and hasattr(reactor, "callLater"):
        from twisted.internet import threads

        return await threads.deferToThreadPool(reactor, threadpool, read)
    return read()

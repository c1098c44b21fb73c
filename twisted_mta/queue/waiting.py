"""Which messages wait for which host: Exim's ``wait-<transport>`` hints.

When the smtp transport defers a message because its hosts failed (or
their retry time had not come), the message's id is recorded under each
host's name in ``<spool>/db/wait-<transport>`` (Exim's
transport_update_waiting()).  A delivery that has just sent a message
over a connection to one of those hosts hands the connection on to the
messages waiting for it, one after another, up to the transport's
``connection_max_messages`` (Exim's transport_check_waiting() and its
continued deliveries).  So a host that comes back gets its backlog down one
connection instead of one connection per message.

The records are ``{"ids": [...]}`` in a L{twisted_mta.hints.HintsStore}, in
the order the messages were deferred.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted_mta.hints import HintsStore

__all__ = ["BUSY", "GONE", "READY", "WaitingDatabase"]

#: What a waiting message is now, for L{WaitingDatabase.take}.
READY, BUSY, GONE = "ready", "busy", "gone"


class WaitingDatabase:
    """The ``wait-<transport>`` databases under ``<spool>/db`` (*run_io* as
    for L{HintsStore}).  Those of *transports* are read now, so that a
    daemon does not read them on its reactor thread later; others on first
    use."""

    def __init__(self, spool_directory: str,
                 run_io: Callable[[Callable[[], None]], Any] | None = None,
                 transports: Iterable[str] = ()) -> None:
        self.directory = os.path.join(spool_directory, "db")
        self._run_io = run_io
        self._stores: dict[str, HintsStore] = {}
        for transport in transports:
            self._store(transport)

    def _store(self, transport: str) -> HintsStore:
        store = self._stores.get(transport)
        if store is None:
            name = f"wait-{transport}"
            store = HintsStore(os.path.join(self.directory, name), self._run_io, name=name)
            self._stores[transport] = store
        return store

    def add(self, transport: str, host_names: Iterable[str], message_id: str) -> None:
        """Record that *message_id* waits for each of *host_names*."""
        store = self._store(transport)
        for name in dict.fromkeys(n.lower() for n in host_names):
            ids = list((store.get(name) or {}).get("ids", []))
            if message_id not in ids:
                ids.append(message_id)
                store.put(name, {"ids": ids})

    def take(self, transport: str, host_name: str,
             state: Callable[[str], str]) -> str | None:
        """The first message waiting for *host_name* that *state* calls
        READY, taken off the list; GONE ones are dropped on the way and
        BUSY ones (being delivered) left for later."""
        store = self._store(transport)
        key = host_name.lower()
        ids = list((store.get(key) or {}).get("ids", []))
        kept: list[str] = []
        found = None
        for index, message_id in enumerate(ids):
            now = state(message_id)
            if now == READY:
                found = message_id
                kept.extend(ids[index + 1:])
                break
            if now == BUSY:
                kept.append(message_id)
        if kept != ids:
            if kept:
                store.put(key, {"ids": kept})
            else:
                store.delete(key)
        return found

    def waiting(self, transport: str, host_name: str) -> list[str]:
        """The ids recorded for *host_name* (for tests and the manhole)."""
        return list((self._store(transport).get(host_name.lower()) or {}).get("ids", []))

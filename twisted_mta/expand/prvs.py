"""BATV "prvs" signed return paths: ``${prvs}`` and ``${prvscheck}``."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

_PRVS = re.compile(r"prvs=(\d)(\d{3})([0-9a-f]{6})=(.+)@(.+)", re.IGNORECASE | re.DOTALL)
_VALID_DAYS = 7


def _daystamp(now: float, offset_days: int = 0) -> str:
    return f"{int(now // 86400) + offset_days:03d}"[-3:]


def _signature(address: str, secret: str, keynum: str, daystamp: str) -> str:
    message = (keynum + daystamp + address).encode("latin-1")
    return hmac.new(secret.encode("latin-1"), message, hashlib.sha1).hexdigest()[:6]


def prvs_encode(address: str, secret: str, keynum: str, now: float) -> str:
    """Sign *address*; the signature expires after seven days."""
    keynum = keynum or "0"
    local, _, domain = address.rpartition("@")
    daystamp = _daystamp(now, _VALID_DAYS)
    return f"prvs={keynum}{daystamp}{_signature(address, secret, keynum, daystamp)}={local}@{domain}"


@dataclass
class PrvsAddress:
    address: str
    keynum: str
    daystamp: str
    signature: str

    def valid(self, secret: str, now: float) -> bool:
        expected = _signature(self.address, secret, self.keynum, self.daystamp)
        if not hmac.compare_digest(expected, self.signature.lower()):
            return False
        remaining = (int(self.daystamp) - int(_daystamp(now))) % 1000
        return remaining <= _VALID_DAYS


def prvs_check(address: str) -> PrvsAddress | None:
    """Decode a prvs address, or None if *address* is not one."""
    m = _PRVS.fullmatch(address)
    if m is None:
        return None
    keynum, daystamp, signature, local, domain = m.groups()
    return PrvsAddress(f"{local}@{domain}", keynum, daystamp, signature)

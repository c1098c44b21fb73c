"""The plain-address shortcut in expand/addresses.py gives what the full
character-by-character parse gives."""

from __future__ import annotations

import random
import re

from twisted_mta.expand import addresses
from twisted_mta.expand.addresses import AddressError, _Parser
from twisted_mta.smtp.params import _EnvelopeParser

_NEVER = re.compile(r"(?!)")

_SAMPLES = [
    "a@b", "<a@b>", " <a@b>\n", "\tuser.name+tag@example.com ", "<sender@localhost>",
    "<20261206.abc$x=y@mail-1.example.org>", ".a.@b", "a..b@c", "a@b.", "a@-b", "a@b-",
    "a@b..c", "<a@b", "a@b>", "<>", "a", "<a>", "a@[1.2.3.4]", "<@r:a@b>", "a @b", "a@ b",
    "\"q\"@b", "a\\b@c", "a(c)@b", "Name <a@b>", "a@b;", "g: a@b;", "a@b,c@d",
    "\xe9t\xe9@b", "a@\xe9", "x" * 250 + "@b", "<" + "x" * 254 + "@b>", "<" + "x" * 255 + "@b>",
    "a@b@c", "a@b c", "a\x01@b", "a@b\x7f",
]


def _both(text: str, make: type[_Parser], *args: object) -> tuple[object, object]:
    def run() -> object:
        parser = make(text, *args)
        try:
            return parser.extract(), parser.found_group, parser.allow_group
        except AddressError as e:
            return "error", e.args[0]

    fast = run()
    saved, addresses._PLAIN = addresses._PLAIN, _NEVER
    try:
        slow = run()
    finally:
        addresses._PLAIN = saved
    return fast, slow


def _random_texts(count: int) -> list[str]:
    rng = random.Random(4096)
    pieces = ["a", "b", "Z", "9", "-", ".", "@", "<", ">", " ", "\n", "(", ")", '"', "\\",
              "[", "]", ":", ";", ",", "\xe9", "$", "+", "\x7f", "x.y", "@c.d"]
    local = ["a", "Z", "9", ".", "-", "+", "$", "\xe9", "=", " ", '"', "("]
    domain = ["a", "Z", "9", ".", "-", "\xe9", "_", " "]
    around = ["", "", " ", "\n", "<", ">", "\t", "("]

    def word(choices: list[str], most: int) -> str:
        return "".join(rng.choice(choices) for _ in range(rng.randint(0, most)))

    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 9))) for _ in range(count)]
    texts += [f"{word(around, 2)}{word(local, 5)}@{word(domain, 6)}{word(around, 2)}"
              for _ in range(count)]
    return texts


def test_shortcut_matches_full_parse() -> None:
    texts = _SAMPLES + _random_texts(5000)
    # The shortcut is taken often enough for the comparison to mean something.
    assert sum(1 for text in texts if addresses._PLAIN.fullmatch(text)) > 100
    for text in texts:
        for make, args in ((_Parser, (False,)), (_Parser, (True,)), (_Parser, (False, True)),
                           (_EnvelopeParser, (True, False)), (_EnvelopeParser, (False, True))):
            fast, slow = _both(text, make, *args)
            assert fast == slow, (text, make, args)

"""Exim's string expansion language.

Values are ``str`` objects holding bytes: each character is one byte, decoded as
Latin-1, so ``${strlen:}`` counts bytes as Exim does and any byte survives a
round trip.  Parse once (:mod:`.parser`), evaluate many times
(:mod:`.evaluate`).
"""

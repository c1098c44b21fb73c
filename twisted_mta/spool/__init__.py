"""The spool: message ids, -H and -D files, recovery."""

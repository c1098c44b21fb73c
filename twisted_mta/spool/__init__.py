"""The spool: message ids, -H and -D files, recovery.

Modules, smallest first:

* :mod:`~twisted_mta.spool.ids`: 4.96 message ids and their allocator;
* :mod:`~twisted_mta.spool.tree`: Exim's AVL trees, which fix the order of
  ACL variables and the shape of the non-recipients in a -H file;
* :mod:`~twisted_mta.spool.flags`: the flag letter of each header;
* :mod:`~twisted_mta.spool.message`: :class:`SpoolMessage`, what a -H
  file holds;
* :mod:`~twisted_mta.spool.header`: writing and reading -H files byte for
  byte as Exim does;
* :mod:`~twisted_mta.spool.store`: the spool directory, durable writes;
* :mod:`~twisted_mta.spool.recovery`: tidying up after a crash.
"""

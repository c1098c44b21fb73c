"""twistd plugin ``exim-py``: ``twistd -n exim-py [-C FILE] [-D NAME=value]
[-q 30m] [--manhole PORT ...]``; see doc/daemon.md and doc/manhole.md."""

from twisted_mta.service import ServiceMaker

exim_py = ServiceMaker()

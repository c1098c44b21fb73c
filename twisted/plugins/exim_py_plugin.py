"""twistd plugin ``exim-py``: ``twistd -n exim-py [-C FILE] [-D NAME=value]``.

Until the server lands, the service loads the configuration, reports any
error the way ``exim -bV`` does, and runs no listeners.
"""

from twisted_mta.service import ServiceMaker

exim_py = ServiceMaker()

"""The exim-py daemon as a twistd plugin: option parsing and the service tree."""

from __future__ import annotations

import sys
from datetime import datetime

from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from twisted_mta.cli import DEFAULT_CONFIG


class Options(usage.Options):
    optParameters = [
        ["config", "C", DEFAULT_CONFIG, "The Exim configuration file to run."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["defines"] = {}

    def opt_D(self, text: str) -> None:
        """Define a macro, NAME=value, overriding the configuration file."""
        name, _, value = text.partition("=")
        self["defines"][name.strip()] = value.strip()


class MTAService(service.MultiService):
    """The daemon: the configuration, and (as they land) the listeners, the
    queue runner and the manhole as child services."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


@implementer(IServiceMaker, IPlugin)
class ServiceMaker:
    tapname = "exim-py"
    description = "A mail transfer agent configured in Exim's language."
    options = Options

    def makeService(self, options: Options) -> service.IService:
        from twisted_mta.config import ConfigError, load_config

        try:
            config = load_config(options["config"], defines=options["defines"] or None)
        except ConfigError as e:
            sys.stderr.write(e.format(datetime.now()) + "\n")
            raise SystemExit(1) from None
        return MTAService(config)

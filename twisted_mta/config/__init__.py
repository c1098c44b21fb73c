"""Exim 4.96 configuration files: reading, typed options and ``-bP``."""

from twisted_mta.config.display import format_all_options, format_driver, format_option
from twisted_mta.config.errors import ConfigError
from twisted_mta.config.model import (
    Acl,
    AclItem,
    AclStatement,
    Config,
    DriverInstance,
    NamedList,
    RetryRule,
    RewriteRule,
)
from twisted_mta.config.parser import load_config, parse_config_text

__all__ = [
    "Acl", "AclItem", "AclStatement", "Config", "ConfigError", "DriverInstance",
    "NamedList", "RetryRule", "RewriteRule", "format_all_options", "format_driver",
    "format_option", "load_config", "parse_config_text",
]

"""exim-py: a mail transfer agent on Twisted that reads Exim's configuration language."""

__version__ = "0.1.0"
#: The Exim release whose behaviour we reproduce; ``$version_number`` reports it.
EXIM_COMPAT_VERSION = "4.96"

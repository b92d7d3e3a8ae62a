"""pfnbd: an NBD server for PureFlash volumes."""

__version__ = "0.1.0"

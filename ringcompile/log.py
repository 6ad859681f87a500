"""The package logger: everything goes through ``logging.getLogger("ringcompile")``."""

import logging

logger = logging.getLogger("ringcompile")


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger: ``get_logger(__name__)`` in ``ringcompile/passes/x.py`` gives
    ``ringcompile.passes.x`` (the package prefix is not repeated)."""
    return logger.getChild(name.removeprefix("ringcompile."))

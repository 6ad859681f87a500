"""The package logger: everything goes through ``logging.getLogger("ringcompile")``."""

import logging

logger = logging.getLogger("ringcompile")


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger, e.g. ``ringcompile.passes.find_attention``."""
    return logger.getChild(name)

"""Placeholder until tile_search runs."""

TRITON_VERSION = ""
PTXAS_VERSION = ""
TEMPLATE_HASH = ""
SHARED_LIMIT = 232448
GENERATED = ""
MEASURED: dict = {}

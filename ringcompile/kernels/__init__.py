"""Block kernels: the pure-torch reference, the CPU block path and generated Triton kernels."""


def __getattr__(name: str):
    """``ringcompile.kernels.show(site)``: the generated Triton source (imported lazily)."""
    if name == "show":
        from .triton import show

        return show
    raise AttributeError(f"module 'ringcompile.kernels' has no attribute {name!r}")

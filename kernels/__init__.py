"""Block kernels: the pure-torch reference, the CPU block path and generated Triton kernels."""

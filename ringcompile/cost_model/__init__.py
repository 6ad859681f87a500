"""The symbolic cost model and planner (``ringcompile.cost_model``).

symbols      the sympy symbols (workload, chunking, hardware)
strategies   time / compute / transfer expressions per strategy, the ring overlap threshold
memory       per-rank peak memory as named terms
profiles     hardware profiles (``profiles/*.toml``, or any TOML path)
evaluate     lambdified expressions: numbers in microseconds
planner      ``plan``, ``plans``, ``Plan``, ``choose_for_call`` (the runtime's per-call choice)
crossover    crossover lengths and the piecewise-in-S best strategy
tiles        Triton tile sizes that fit a profile's shared memory
calibrate    measure this machine into a profile (``ringcompile calibrate``)
cli          ``ringcompile plan`` / ``ringcompile calibrate``

Nothing here imports at package import time, so ``import ringcompile`` stays cheap.
"""

"""The sympy symbols of the cost model: workload, chunking, and hardware.

Every expression in ``strategies`` and ``memory`` is written over these, so a reader can
print any of them and see which quantity each term depends on. All are positive reals;
times are in seconds, sizes in bytes, rates in FLOP/s or bytes/s.
"""

from __future__ import annotations

import sympy as sp

_pos = {"positive": True, "real": True}

# workload
S = sp.Symbol("S", **_pos)          # global sequence length (tokens)
N = sp.Symbol("N", **_pos)          # ranks in the ring (group size)
B = sp.Symbol("B", **_pos)          # batch
Hq = sp.Symbol("H_q", **_pos)       # query heads
Hkv = sp.Symbol("H_kv", **_pos)     # key/value heads (GQA: Hkv < Hq)
D = sp.Symbol("D", **_pos)          # head dim
e = sp.Symbol("e", **_pos)          # bytes per element of q/k/v
f = sp.Symbol("f", **_pos)          # fraction of score pairs computed (1, or ~1/2 causal)
d = sp.Symbol("d", **_pos)          # mask density beyond causality: kept fraction of block pairs

# chunking
c = sp.Symbol("c", **_pos)          # K/V tokens per ring transfer chunk (block size)

# hardware profile
F = sp.Symbol("F", **_pos)          # attention-kernel matmul rate per rank (FLOP/s, efficiency applied)
M = sp.Symbol("M", **_pos)          # memory bandwidth per rank (bytes/s)
W = sp.Symbol("W", **_pos)          # point-to-point link bandwidth per direction (bytes/s)
Wa = sp.Symbol("W_a2a", **_pos)     # all-to-all bandwidth per rank (bytes/s)
alpha = sp.Symbol("alpha", **_pos)  # per-message latency (s)
P = sp.Symbol("P", nonnegative=True, real=True)   # fp32 passes over the score tile per block pair
o = sp.Symbol("o", nonnegative=True, real=True)   # fixed overhead per kernel tile (s)
k = sp.Symbol("k", **_pos)          # kernel tile edge (tokens)
kb = sp.Symbol("k_b", **_pos)       # backward / forward compute ratio
tc = sp.Symbol("t_c", **_pos)       # causal skipping granularity of the kernel (tokens)
Ph = sp.Symbol("P_h", **_pos)       # cores the ranks share (N when every rank has its own device)
h = sp.Symbol("h", nonnegative=True, real=True)   # host overhead per ring step per rank (s): Python, buffers

# two-level groups (strategy "hybrid": all-to-all over heads inside a node, ring across nodes)
Ni = sp.Symbol("N_i", **_pos)       # inner ranks (the all-to-all group; the ring has N / N_i ranks)
r = sp.Symbol("r_kv", **_pos)       # copies of each kv head the inner all-to-all needs (GQA, H_kv < N_i)
Wi = sp.Symbol("W_i", **_pos)       # all-to-all bandwidth per rank inside the inner group (bytes/s)
alpha_i = sp.Symbol("alpha_i", **_pos)   # per-message latency inside the inner group (s)

WORKLOAD = (S, N, B, Hq, Hkv, D, e, f, d)
HARDWARE = (F, M, W, Wa, alpha, P, o, k, kb, tc, Ph, h)
TWO_LEVEL = (Ni, r, Wi, alpha_i)
ALL = (*WORKLOAD, c, *HARDWARE)
ALL_TWO_LEVEL = (*ALL, *TWO_LEVEL)   # the arguments of the hybrid model's functions

# bytes of the fp32 accumulators (out, lse, dK/dV in flight) whatever the input dtype
ACC = 4

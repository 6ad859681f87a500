"""Tiles measured offline for sm_90 by ``python -m ringcompile.kernels.triton.tile_search``.

Generated: do not edit. Per (kernel, head-dim class, dtype): the candidates compiled, in
preference order, with {specialisation: (shared bytes, registers, spill bytes)}, up to the
first that fits for both specialisations (see ``tiles.chosen``); a cell without such a row
was not finished (launches then skip the rows measured as not fitting)."""

TRITON_VERSION = '3.6.0'
PTXAS_VERSION = '12.8 (V12.8.93, ptxas)'
TEMPLATE_HASH = '4308201f4021'
SHARED_LIMIT = 232448
GENERATED = '2026-12-02 14:38 UTC'  # vm, 220 s

MEASURED = {
    ('dkdv', 128, 'bf16'): [
        ((64, 128, 8, 3), {'plain': (99328, 255, 388)}),
        ((32, 128, 8, 3), {'plain': (82432, 255, 216)}),
        ((64, 128, 8, 2), {'plain': (98816, 255, 356)}),
        ((32, 128, 8, 2), {'plain': (82176, 255, 216)}),
        ((32, 64, 8, 2), {'plain': (49408, 254, 0), 'heavy': (49408, 255, 96)}),
        ((32, 64, 4, 2), {'plain': (49408, 255, 136)}),
        ((16, 64, 4, 2), {'plain': (41088, 255, 288)}),
        ((16, 64, 8, 1), {'plain': (40960, 216, 0), 'heavy': (40960, 221, 0)}),
    ],
    ('fwd', 256, 'bf16'): [
        ((64, 64, 8, 3), {'plain': (65536, 255, 208)}),
        ((64, 64, 8, 2), {'plain': (65536, 255, 208)}),
        ((64, 32, 8, 2), {'plain': (49152, 255, 0), 'heavy': (49152, 255, 32)}),
        ((32, 64, 8, 2), {'plain': (53248, 246, 0), 'heavy': (53248, 222, 0)}),
    ],
    ('dq', 256, 'bf16'): [
        ((64, 32, 8, 2), {'plain': (98304, 255, 1080)}),
        ((64, 16, 8, 2), {'plain': (81920, 255, 584)}),
        ((64, 16, 8, 1), {'plain': (81920, 255, 584)}),
        ((32, 16, 8, 1), {'plain': (49152, 254, 0), 'heavy': (49152, 251, 0)}),
    ],
}

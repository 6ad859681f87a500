"""Which rank holds which cache slot of a sharded KV cache: the prefill layout plus the append policy.

A sharded cache is described by what every rank knows without talking: the world size, the
prefill length and layout (the prefill's sequence shards, clipped to the true length, so no rank
stores padding) and the append policy for tokens after the prefill. From these each rank can
compute every rank's shard length and slot list, which is what the decode metadata check
compares against (``runtime/decode.py``).

Append policies (pure functions of the lengths, so all ranks pick the same owner):

* ``shortest``: the new slot goes to the rank with the shortest shard (lowest rank on ties).
  It first evens out the imbalance a clipped prefill leaves (the last contiguous shard is
  short), then keeps max - min <= 1.
* ``round_robin``: slot t goes to rank t mod N; keeps the prefill's imbalance, but the owner of
  a slot needs no history (cheap to state in a compiled graph).
"""

from __future__ import annotations

import dataclasses
import functools

from ringcompile.cache_codes import POLICIES
from ringcompile.errors import OptionError

from .layouts import check_layout, local_chunks, padded_length


def append_owner(lengths: list[int] | tuple[int, ...], slot: int, policy: str = "shortest") -> int:
    """The rank that stores cache slot ``slot`` given every rank's current shard length."""
    if policy == "shortest":
        return min(range(len(lengths)), key=lambda r: (lengths[r], r))
    if policy == "round_robin":
        return slot % len(lengths)
    raise OptionError(f"append policy must be one of {list(POLICIES)}, got {policy!r}")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """A sharded KV cache's slot ownership: ``world`` ranks, a ``prefill_len``-token prefill in
    ``prefill_layout`` (contiguous or zigzag, clipped to the true length), then appends by ``policy``."""

    world: int
    prefill_len: int
    prefill_layout: str = "contiguous"
    policy: str = "shortest"

    def __post_init__(self) -> None:
        check_layout(self.prefill_layout)
        if self.policy not in POLICIES:
            raise OptionError(f"append policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.world < 1 or self.prefill_len < 0:
            raise OptionError(f"CacheLayout needs world >= 1 and prefill_len >= 0, got {self.world}, "
                              f"{self.prefill_len}")

    def prefill_slots(self, rank: int) -> list[int]:
        """The prefill slots ``rank`` holds, in local order (its sequence shard without the padding)."""
        padded = padded_length(self.prefill_len, self.world, self.prefill_layout)
        return [t for a, b in local_chunks(padded, self.world, rank, self.prefill_layout)
                for t in range(a, min(b, self.prefill_len))]

    def owners(self, cache_len: int) -> tuple[int, ...]:
        """owners(T)[t] = the rank holding slot t, for t < T."""
        return _owners(self, cache_len)

    def owner(self, slot: int) -> int:
        """The rank holding ``slot`` (O(N log T) for an appended slot: what a decode step asks)."""
        if slot >= self.prefill_len:
            return append_owner(self.lengths(slot), slot, self.policy)
        padded = padded_length(self.prefill_len, self.world, self.prefill_layout)
        chunks = [local_chunks(padded, self.world, r, self.prefill_layout) for r in range(self.world)]
        return next(r for r in range(self.world) if any(a <= slot < b for a, b in chunks[r]))

    def prefill_lengths(self, upto: int | None = None) -> list[int]:
        """Every rank's count of prefill slots below ``upto`` (default: all of them)."""
        upto = self.prefill_len if upto is None else min(upto, self.prefill_len)
        padded = padded_length(self.prefill_len, self.world, self.prefill_layout)
        chunks = [local_chunks(padded, self.world, r, self.prefill_layout) for r in range(self.world)]
        return [sum(max(0, min(b, upto) - a) for a, b in chunks[r]) for r in range(self.world)]

    def lengths(self, cache_len: int) -> list[int]:
        """Every rank's shard length once the cache holds ``cache_len`` slots (closed form: O(N log T),
        so the per-token metadata check never walks the cache's history)."""
        if cache_len <= self.prefill_len:
            return self.prefill_lengths(cache_len)
        base = self.prefill_lengths()
        appended = cache_len - self.prefill_len
        if self.policy == "round_robin":
            return [b + _count_mod(self.prefill_len, cache_len, self.world, r) for r, b in enumerate(base)]
        return _water_fill(base, appended)

    def slots(self, rank: int, cache_len: int) -> list[int]:
        """The global slots ``rank`` holds, in local order (prefill shard first, then its appends)."""
        pre = [t for t in self.prefill_slots(rank) if t < cache_len]
        owners = self.owners(cache_len)
        return pre + [t for t in range(self.prefill_len, cache_len) if owners[t] == rank]


@functools.lru_cache(maxsize=64)
def _owners(layout: CacheLayout, cache_len: int) -> tuple[int, ...]:
    owners = [0] * cache_len
    lengths = [0] * layout.world
    for r in range(layout.world):
        for t in layout.prefill_slots(r):
            if t < cache_len:
                owners[t] = r
                lengths[r] += 1
    for t in range(layout.prefill_len, cache_len):
        r = append_owner(lengths, t, layout.policy)
        owners[t] = r
        lengths[r] += 1
    return tuple(owners)


def _count_mod(lo: int, hi: int, n: int, r: int) -> int:
    """How many t in [lo, hi) have t mod n == r."""
    return (hi - r + n - 1) // n - (lo - r + n - 1) // n


def _water_fill(base: list[int], added: int) -> list[int]:
    """Lengths after ``added`` appends, each to the shortest shard (lowest rank on ties)."""
    lo, hi = min(base), max(base) + added
    while lo < hi:  # the highest level h with sum(max(0, h - b)) <= added
        mid = (lo + hi + 1) // 2
        if sum(max(0, mid - b) for b in base) <= added:
            lo = mid
        else:
            hi = mid - 1
    out = [max(b, lo) for b in base]
    rest = added - sum(o - b for o, b in zip(out, base, strict=True))
    for r in range(len(out)):
        if rest and out[r] == lo:
            out[r] += 1
            rest -= 1
    return out

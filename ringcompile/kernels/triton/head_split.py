"""Head dims held as power-of-two column pieces instead of one padded tile (issue 16 item 8).

Triton tiles are powers of two (``tl.arange``, ``tl.dot`` operands). A head dim that is the sum of
two powers of two, each at least 16 (``tl.dot``'s minimum), can be held as two exact tiles: 80 = 64 +
16, 96 = 64 + 32, 160 = 128 + 32, 192 = 128 + 64. A dot over the head dim is then two dots chained
through the accumulator, and a tile with head-dim columns (q, k, v, dO, acc, dQ, dK, dV) is two
tiles, so no MMA work is spent on padding and no load needs a head-dim mask. Any other dim (a power
of two, or one whose tail would be under 16, e.g. 72 = 64 + 8) stays one tile padded to the next
power of two with masked lanes, and generates exactly the source it did before pieces existed.

Only the dims in ``SPLIT_DIMS`` are split: those the tile tables measured split (``tiles.SPLIT_D_CLASSES``).
Another dim launches with its power of two's tiles, measured for the padded kernel, and a split kernel
can spill there where the padded one does not (offline sm_90, triton 3.9, D=160 dK/dV at the D=256 row's
(32, 32, 8, 1), bf16: 14144 B split, 24 B padded; BENCHMARKS.md). To split another dim, add it here and
to ``tiles.SPLIT_D_CLASSES`` and search its tiles (``tile_search --dims``).

The template marks what depends on a head dim (the ``template`` module's docstring lists the
markers); ``expand`` writes those statements once per piece before the ``%%NAME%%`` holes are filled.
"""

from __future__ import annotations

import dataclasses
import re

MIN_PIECE = 16  # tl.dot needs every dimension >= 16
MAX_PIECES = 2  # a main part plus one tail: more dots per tile pay more than the padding they save


def pad_dim(d: int) -> int:
    """The power of two (at least 16, what tl.dot needs) a padded head dim is held in."""
    p = MIN_PIECE
    while p < d:
        p *= 2
    return p


# the head dims held split (see the module docstring): each has tile-table rows measured split
SPLIT_DIMS = frozenset({80, 96})


def split_widths(d: int) -> tuple[int, ...] | None:
    """The power-of-two widths ``d`` is held as, largest first, or None when it is padded instead."""
    return power_of_two_parts(d) if d in SPLIT_DIMS else None


def power_of_two_parts(d: int) -> tuple[int, ...] | None:
    """``d`` as two powers of two, each at least 16, largest first, or None (a power of two needs no
    split; a remainder under 16 or more than two pieces is not worth one)."""
    widths, rest = [], d
    while rest:
        w = 1 << (rest.bit_length() - 1)
        widths.append(w)
        rest -= w
    if len(widths) == 1 or len(widths) > MAX_PIECES or min(widths) < MIN_PIECE:
        return None
    return tuple(widths)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One column tile of a head dim."""

    suffix: str  # appended to the names of this piece's tiles ("" for the single padded tile)
    offset: int  # its first head-dim column
    width: int  # its columns, a power of two
    padded: bool  # the single tile of a padded dim: lanes past the head dim are masked


def pieces(d: int) -> tuple[Piece, ...]:
    """The tiles head dim ``d`` is held as."""
    widths = split_widths(d)
    if widths is None:
        return (Piece("", 0, pad_dim(d), True),)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    return tuple(Piece(str(i), off, w, False) for i, (off, w) in enumerate(zip(offsets, widths, strict=True)))


# per marker: the padded tile's width constant and lane mask in the generated source
_PAD_NAME = {"d": "D_PAD", "dv": "DV_PAD"}
_OK_NAME = {"d": "d_ok", "dv": "dv_ok"}
_DIM_NAME = {"d": ("HEAD_DIM", "query/key head dim"), "dv": ("V_HEAD_DIM", "value head dim")}


def header_lines(dims: dict[str, tuple[Piece, ...]], sizes: dict[str, int]) -> list[str]:
    """The module's head-dim constants: each dim, then the padded width of each padded dim."""
    lines = []
    for key in ("d", "dv"):
        name, what = _DIM_NAME[key]
        ps = dims[key]
        if ps[0].padded:
            note = ("query/key head dim, padded to D_PAD with masking" if key == "d"
                    else "value head dim, padded to DV_PAD")
        else:
            note = f"{what}, held as {' + '.join(str(p.width) for p in ps)} columns (no padding)"
        lines.append(f"{name} = tl.constexpr({sizes[key]})  # {note}")
    padded = [key for key in ("d", "dv") if dims[key][0].padded]
    lines += [f"{_PAD_NAME[key]} = tl.constexpr({dims[key][0].width})" for key in padded]
    return lines


def offset_lines(dims: dict[str, tuple[Piece, ...]]) -> list[str]:
    """Each piece's head-dim column indices, then the lane masks of padded dims."""
    lines = []
    for key in ("d", "dv"):
        for p in dims[key]:
            base = f"{p.offset} + " if p.offset else ""
            width = _PAD_NAME[key] if p.padded else str(p.width)
            lines.append(f"offs_{key}{p.suffix} = {base}tl.arange(0, {width})")
    padded = [key for key in ("d", "dv") if dims[key][0].padded]
    lines += [f"{_OK_NAME[key]} = offs_{key} < {_DIM_NAME[key][0]}" for key in padded]
    return lines


# ---------------------------------------------------------------------------- marker expansion

_MARKER = re.compile(r"@(dv|d|DV|D)(?!\w)")
_LEADING_HOLES = re.compile(r"^((?:%%\w+%%)*)")
_TRAILING_HOLES = re.compile(r"^(.*?)((?:%%\w+%%)*)$", re.S)


def expand(text: str, dims: dict[str, tuple[Piece, ...]]) -> str:
    """Write the template's head-dim statements once per piece (see the ``template`` docstring).

    ``dims`` maps ``"d"`` (query/key) and ``"dv"`` (value) to their pieces. A single padded piece
    gives the text with its markers removed."""
    out: list[str] = []
    for stmt in _statements(text.split("\n")):
        out += _expand_statement(stmt, dims)
    return "\n".join(out)


def _statements(lines: list[str]) -> list[list[str]]:
    """Lines grouped into statements: a line and its continuations while brackets are open."""
    stmts, current, depth = [], [], 0
    for line in lines:
        current.append(line)
        depth += sum(line.count(c) for c in "([") - sum(line.count(c) for c in ")]")
        if depth <= 0:
            stmts.append(current)
            current, depth = [], 0
    if current:
        stmts.append(current)
    return stmts


def _expand_statement(stmt: list[str], dims: dict[str, tuple[Piece, ...]]) -> list[str]:
    text = _contract("\n".join(stmt), dims)
    keys = {m.group(1) for m in _MARKER.finditer(text)}
    if not keys:
        return text.split("\n")
    if len(keys) > 1 or not keys <= {"d", "dv"}:
        raise AssertionError(f"a template statement mixes head-dim markers {sorted(keys)}: {text!r}")
    key = keys.pop()
    prefix = _LEADING_HOLES.match(text).group(1)  # holes that open the line belong to it once
    body = text[len(prefix):]
    first = body.split("\n", 1)[0]
    marks_before_call = len(_MARKER.findall(first.split("(", 1)[0]))
    out: list[str] = []
    for i, piece in enumerate(dims[key]):
        lines = _substitute(body, key, piece).split("\n")
        shift = " " * (marks_before_call * len(piece.suffix))  # keep continuations aligned
        lines = [lines[0], *(shift + ln for ln in lines[1:])]
        out += [(prefix if i == 0 else "") + lines[0], *lines[1:]]
    return out


def _substitute(text: str, key: str, piece: Piece) -> str:
    """One piece's copy of a statement: its width, its lane mask (padded only), its names."""
    pad = _PAD_NAME[key]
    text = re.sub(rf"(?<!\w){pad}@{key}(?!\w)", pad if piece.padded else str(piece.width), text)
    mask = re.compile(rf" & {_OK_NAME[key]}@{key}(\[[^\]]*\])")
    text = mask.sub((lambda m: f" & {_OK_NAME[key]}{m.group(1)}") if piece.padded else "", text)
    return re.sub(rf"@{key}(?!\w)", piece.suffix, text)


def _contract(text: str, dims: dict[str, tuple[Piece, ...]]) -> str:
    """``tl.dot(a@D, b@D<holes>)``: a dot over the head dim, chained through the accumulator over
    the pieces (``tl.dot(a1, b1, tl.dot(a0, b0<holes>)<holes>)``); ``@DV`` likewise over DV."""
    out, i = [], 0
    while (start := text.find("tl.dot(", i)) >= 0:
        open_at = start + len("tl.dot(")
        close = _closing(text, open_at)
        inner = text[open_at:close]
        keys = {m.group(1) for m in _MARKER.finditer(inner)}
        if not keys & {"D", "DV"}:
            out.append(text[i:close + 1])
            i = close + 1
            continue
        if len(keys) > 1:
            raise AssertionError(f"a contraction mixes head-dim markers {sorted(keys)}: {inner!r}")
        key = keys.pop()
        args = _split_args(inner)
        if len(args) != 2:
            raise AssertionError(f"a head-dim contraction takes two operands: {inner!r}")
        a, (b, holes) = args[0], _TRAILING_HOLES.match(args[1]).groups()
        expr = None
        for piece in dims[key.lower()]:
            ai, bi = (re.sub(rf"@{key}(?!\w)", piece.suffix, x) for x in (a, b))
            acc = f", {expr}" if expr is not None else ""
            expr = f"tl.dot({ai}, {bi}{acc}{holes})"
        out.append(text[i:start] + expr)
        i = close + 1
    out.append(text[i:])
    return "".join(out)


def _closing(text: str, open_at: int) -> int:
    """Index of the bracket closing the one just before ``open_at``."""
    depth = 1
    for j in range(open_at, len(text)):
        depth += (text[j] in "([") - (text[j] in ")]")
        if depth == 0:
            return j
    raise AssertionError(f"unbalanced brackets after {text[max(0, open_at - 20):open_at]!r}")


def _split_args(inner: str) -> list[str]:
    """Top-level comma-separated arguments of a call's text."""
    args, depth, start = [], 0, 0
    for j, c in enumerate(inner):
        depth += (c in "([") - (c in ")]")
        if c == "," and depth == 0:
            args.append(inner[start:j].strip())
            start = j + 1
    args.append(inner[start:].strip())
    return args

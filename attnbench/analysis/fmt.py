"""Number formatting, in one place, for every table attnbench prints or writes: the run's end-of-run
summary, ``attnbench show``, the Markdown and HTML reports and the comparison report. No torch, no
pandas.

Rules: a fixed number of significant digits (3; trailing zeros kept, so a column lines up), never
scientific notation, a unit that scales with the value (µs / ms / s, KiB / MiB / GiB, MFLOP / GFLOP /
TFLOP), thousands grouped with commas, a failed cell shown by its status word, a noisy cell
marked ``~``. Column headings name what they count: ``224 px`` and ``3,136 tok`` for a resolution,
``S1`` with its token grid, dim and heads for a named stage.
"""

from __future__ import annotations

import math
from typing import Any

SIG = 3  # significant digits of every measured value

NOISY_MARK = "~"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def group(n: float) -> str:
    """An integer with its thousands grouped: ``65,536``."""
    return f"{int(round(n)):,}"


def sig(v: Any, digits: int = SIG) -> str:
    """``v`` to ``digits`` significant digits, trailing zeros kept, never in scientific notation:
    0.01234 -> ``0.0123``, 1.5 -> ``1.50``, 1894 -> ``1,890``; ``-`` for no value."""
    f = _finite(v)
    if f is None:
        return "-"
    if f == 0:
        return "0"
    exp = math.floor(math.log10(abs(f)))
    decimals = digits - 1 - exp
    rounded = round(f, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) != exp:  # 9.996 -> 10.0: one digit fewer
        decimals -= 1
        rounded = round(f, decimals)
    if decimals <= 0:
        return group(rounded)
    return f"{rounded:.{decimals}f}"


def _scaled(v: Any, steps: list[tuple[float, str]], digits: int = SIG) -> str:
    f = _finite(v)
    if f is None:
        return "-"
    for size, unit in steps:
        if abs(f) >= size * 0.9995 or (size, unit) == steps[-1]:
            return f"{sig(f / size, digits)} {unit}"
    return "-"


def ms(v: Any, digits: int = SIG) -> str:
    """A time in milliseconds, in the unit that suits it: ``812 µs``, ``12.3 ms``, ``1.89 s``."""
    f = _finite(v)
    if f is None:
        return "-"
    if abs(f) >= 999.5:
        return f"{sig(f / 1e3, digits)} s"
    if 0 < abs(f) < 0.9995:
        return f"{sig(f * 1e3, digits)} µs"
    return f"{sig(f, digits)} ms"


def nbytes(v: Any, digits: int = SIG) -> str:
    """Bytes in binary units: ``512 KiB``, ``96.0 MiB``, ``1.20 GiB``."""
    return _scaled(v, [(2.0 ** 40, "TiB"), (2.0 ** 30, "GiB"), (2.0 ** 20, "MiB"), (2.0 ** 10, "KiB"), (1.0, "B")],
                   digits)


def flops(v: Any, digits: int = SIG) -> str:
    """FLOPs: ``412 MFLOP``, ``1.23 GFLOP``, ``4.56 TFLOP``."""
    return _scaled(v, [(1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"),
                       (1.0, "FLOP")], digits)


def macs(v: Any, digits: int = SIG) -> str:
    """Multiply-accumulates (fvcore's count, the vision papers' "FLOPs"): ``4.51 GMAC``."""
    return _scaled(v, [(1e12, "TMAC"), (1e9, "GMAC"), (1e6, "MMAC"), (1e3, "kMAC"), (1.0, "MAC")], digits)


def rate(v: Any, unit: str = "img/s", digits: int = SIG) -> str:
    f = _finite(v)
    return "-" if f is None else f"{sig(f, digits)} {unit}"


def pct(v: Any, digits: int = 2) -> str:
    """A fraction as a percentage: 0.0312 -> ``3.1%``."""
    f = _finite(v)
    return "-" if f is None else f"{sig(100 * f, digits)}%"


def times(v: Any, digits: int = SIG) -> str:
    """A ratio: ``2.35x``."""
    f = _finite(v)
    return "-" if f is None else f"{sig(f, digits)}x"


def exponent(k: Any, stderr: Any = None) -> str:
    """A fitted exponent with its standard error: ``1.98 ± 0.03``."""
    f = _finite(k)
    if f is None:
        return "-"
    e = _finite(stderr)
    return f"{f:.2f}" + (f" ± {e:.2f}" if e is not None else "")


# column -> (formatter of the raw value, unit-less short title, better: "low" | "high" | "")
COLUMNS: dict[str, tuple[Any, str, str]] = {
    "latency_ms_median": (ms, "latency (median)", "low"),
    "peak_mem_bytes": (nbytes, "peak memory of one call", "low"),
    "flops_analytic": (flops, "FLOPs (analytic)", ""),
    "macs_fvcore": (macs, "MACs (fvcore: the papers' FLOPs)", ""),
    "throughput_img_s": (rate, "throughput", "high"),
    "latency_cv": (pct, "latency spread (CV)", ""),
}


def value(column: str, v: Any) -> str:
    """The raw value of a row's column (bytes, FLOPs, ms, a fraction) as a table shows it."""
    f = COLUMNS.get(column, (sig, "", ""))[0]
    return f(v)


def better(column: str) -> str:
    """``low`` or ``high`` where a column has a best value worth marking, else ``""``."""
    return COLUMNS.get(column, (None, "", ""))[2]


def spread(p10: Any, p90: Any) -> str:
    """The p10..p90 band of the timed calls: ``11.9-12.8 ms``."""
    lo, hi = _finite(p10), _finite(p90)
    if lo is None or hi is None:
        return ""
    a, b = ms(lo), ms(hi)
    ua, ub = a.split(" ")[-1], b.split(" ")[-1]
    return f"{a.rsplit(' ', 1)[0]}-{b}" if ua == ub else f"{a}-{b}"


def resolution_heading(resolution: Any, tokens: Any = None) -> str:
    """``224 px · 3,136 tok``: the image side and the token count N."""
    r = _finite(resolution)
    head = f"{int(r)} px" if r is not None else str(resolution)
    t = _finite(tokens)
    return head + (f" · {group(t)} tok" if t is not None else "")


def shape_heading(name: str, grid_h: Any = None, grid_w: Any = None, dim: Any = None, heads: Any = None) -> str:
    """``S1 · 56×56 tok · C96 h3``: a named stage with its token grid, channels and heads."""
    parts = [str(name)]
    gh, gw = _finite(grid_h), _finite(grid_w)
    if gh is not None and gw is not None:
        parts.append(f"{int(gh)}×{int(gw)} tok")
    d, h = _finite(dim), _finite(heads)
    if d is not None:
        parts.append(f"C{int(d)}" + (f" h{int(h)}" if h is not None else ""))
    return " · ".join(parts)

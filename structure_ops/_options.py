"""Option parsing shared by the public API and the reference oracle.

Strings are the user-facing vocabulary; the compiled kernels receive small integer codes. Keeping the
table here means one spelling of each option, one error message, one mapping to codes.
"""

from __future__ import annotations

import math

WEIGHTINGS = ("none", "inverse")
CENTERINGS = ("mean", "standard", "none")
SIMILARITIES = ("cosine", "rbf")
DIVERGENCES = ("structure", "js")
K_RULES = ("rice", "sqrt", "sturges")


def option_code(name: str, value: object, choices: tuple[str, ...]) -> int:
    """Index of ``value`` in ``choices``; a ValueError naming the argument otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return choices.index(value)


def resolve_k(k: int | str, n: int) -> int:
    """Neighbourhood size for ``n`` rows: an int, or a rule of docs/spec.md §3.

    "rice" = ceil(2 n^(1/3)), "sqrt" = ceil(sqrt(n)), "sturges" = ceil(log2(n) + 1). A rule's value is
    clipped to n - 1 (the diagonal is excluded, so at most n - 1 neighbours exist); an explicit int
    outside [1, n - 1] is an error.
    """
    if isinstance(k, bool):
        raise TypeError(f"k must be an int or one of {list(K_RULES)}, got {k!r}")
    if isinstance(k, str):
        if k not in K_RULES:
            raise ValueError(f"k must be an int or one of {list(K_RULES)}, got {k!r}")
        # A tiny slack keeps exact cubes/squares (n = 1000 → 20, not 21) from rounding up.
        raw = {"rice": 2.0 * n ** (1.0 / 3.0), "sqrt": math.sqrt(n), "sturges": math.log2(n) + 1.0}[k]
        return max(1, min(n - 1, math.ceil(raw - 1e-9)))
    if not isinstance(k, int):
        raise TypeError(f"k must be an int or one of {list(K_RULES)}, got {type(k).__name__}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must satisfy 1 <= k <= N - 1 = {n - 1} (diagonal excluded), got k={k}")
    return k

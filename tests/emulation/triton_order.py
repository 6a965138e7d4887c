"""Program order for Triton's interpreter (TRITON_INTERPRET=1): run a launch's programs reversed or shuffled.

The interpreter runs the programs of a grid one after another, x outermost, z innermost (triton 3.7.1:
``GridExecutor.__call__`` in triton/runtime/interpreter.py), so a kernel in which one program reads what another
wrote in the same launch (or that relies on program 0 running first) still passes there. ``program_order``
patches the interpreter's builder: ``set_grid_dim`` draws a permutation of the grid for each launch and
``set_grid_idx`` maps the k-th program of the loop to the permutation's k-th grid index, so every program still
runs exactly once, in another order. A kernel whose outputs are order independent gives bitwise-equal results
(every kernel of this project is atomic-free, so no reduction order changes either).

Limits: programs still never overlap in time (a race between concurrently running programs cannot show), and the
patch depends on the interpreter's builder (``interpreter_builder.set_grid_dim/set_grid_idx``); ``available()``
says whether it applies.
"""

from __future__ import annotations

import contextlib
import os
import random
import types

ORDERS = ("inorder", "reversed", "shuffled")


def available() -> str | None:
    """None when the patch applies here, else why not."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "needs Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU)"
    try:
        from triton.runtime import interpreter
    except ImportError as e:  # pragma: no cover - triton is a test dependency
        return f"triton's interpreter cannot be imported: {e}"
    b = getattr(interpreter, "interpreter_builder", None)
    if b is None or not hasattr(b, "set_grid_dim") or not hasattr(b, "set_grid_idx"):
        return "this triton's interpreter has no interpreter_builder.set_grid_dim/set_grid_idx"
    return None


@contextlib.contextmanager
def program_order(order: str = "shuffled", seed: int = 0):
    """Inside, every interpreted launch runs its programs in ``order`` ("shuffled": a fresh permutation per launch
    drawn from ``seed``). Yields a dict counting launches, programs and programs run out of the in-order place."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    reason = available()
    if reason:
        raise RuntimeError(reason)
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    cls = type(builder)
    rng = random.Random(seed)
    counts = {"launches": 0, "programs": 0, "moved": 0}
    perm: list[int] = []

    def set_grid_dim(self, nx, ny, nz):
        cls.set_grid_dim(self, nx, ny, nz)
        perm[:] = range(nx * ny * nz)
        if order == "reversed":
            perm.reverse()
        elif order == "shuffled":
            rng.shuffle(perm)
        counts["launches"] += 1

    def set_grid_idx(self, x, y, z):
        _, ny, nz = self.grid_dim
        k = (x * ny + y) * nz + z  # the position of (x, y, z) in the interpreter's loop
        p = perm[k]
        px, rest = divmod(p, ny * nz)
        py, pz = divmod(rest, nz)
        counts["programs"] += 1
        counts["moved"] += p != k
        cls.set_grid_idx(self, px, py, pz)

    builder.set_grid_dim = types.MethodType(set_grid_dim, builder)
    builder.set_grid_idx = types.MethodType(set_grid_idx, builder)
    try:
        yield counts
    finally:
        del builder.set_grid_dim
        del builder.set_grid_idx

"""Emulated CPU builds of csrc/cuda/*.cu (see README.md in this folder).

``translate(name)`` turns csrc/cuda/<name>_cuda.cu into a C++ file that compiles against cuda_emu.h: the kernels and
the host code stay textually the same except for

* ``kernel<<<grid, block, smem, stream>>>(args)`` → ``so_emu::launch("kernel", &kernel, grid, block, smem, stream)(args)``
* ``__launch_bounds__(B, ...)`` → a check ``so_emu::check_launch_bounds(B)`` as the kernel body's first statement
* ``at::empty`` → ``so_emu::empty`` (NaN-poisoned), ``at::mm_out``/``at::addmm_out`` → ``so_emu::mm_out``/
  ``so_emu::addmm_out`` (the half → fp32 GEMMs the CPU lacks), ``x.is_cuda()`` → ``true`` (CPU tensors stand in for device tensors), the CUDA headers dropped,
  ``TORCH_LIBRARY_IMPL(structure_ops, CUDA, m)`` → ``TORCH_LIBRARY(so_emu_<name>, m)`` with ``m.def``.

Every replacement asserts that its pattern is present, so a change of the .cu file that the emulation does not
follow fails loudly. ``build(name)`` compiles one file once per process (a test session; ``prebuild`` starts
several in the background) and returns an
``Emulated`` handle: ``.ops`` (the ops under torch.ops.so_emu_<name>), ``.schedule(...)`` (block/warp order,
block and grid overrides) and ``.stats()``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SHIM = HERE / "cuda_emu.h"
NAMES = ("structure", "clip", "knn", "siglip")
ORDERS = ("inorder", "reversed", "shuffled")

# Kernels whose result must not depend on the block size the host picks (strided loops over blockDim.x and
# block reductions for any multiple of 32): the tests override their block size (up to their __launch_bounds__).
# Kernels with grid-stride loops: the tests also override their grid size.
BLOCK_GENERIC = {
    "structure": ("l1_rows_kernel", "l1_lse_kernel", "l1_terms_kernel", "l1_grad_kernel", "level_div_kernel",
                  "softmax_bwd_kernel", "finalize_level1_kernel", "finalize_levels_kernel"),
    "clip": ("clip_fwd_finalize_kernel", "clip_bwd_rows_kernel", "clip_bwd_finalize_kernel",
             "scale_accumulate_kernel"),
    "knn": ("knn_sanitize_kernel", "knn_drop_diag_kernel"),
    "siglip": ("siglip_rows_kernel", "siglip_finalize_kernel", "siglip_scale_kernel"),
}  # fmt: skip
GRID_STRIDE = {
    "structure": (), "clip": ("scale_accumulate_kernel",), "knn": ("knn_sanitize_kernel",),
    "siglip": ("siglip_scale_kernel",),
}  # fmt: skip
# Every kernel each file defines (the launch rewrite must find a launch of each).
KERNELS = {
    "structure": ("l1_rows_kernel", "l1_lse_kernel", "l1_terms_kernel", "l1_grad_kernel", "level_div_kernel",
                  "softmax_bwd_kernel", "sq_norms_kernel", "finalize_level1_kernel", "finalize_levels_kernel"),
    "clip": ("clip_fwd_tile_kernel", "clip_fwd_merge_kernel", "clip_fwd_finalize_kernel", "clip_bwd_rows_kernel",
             "clip_bwd_finalize_kernel", "scale_accumulate_kernel"),
    "knn": ("knn_topk_rows_kernel", "knn_sanitize_kernel", "knn_drop_diag_kernel"),
    "siglip": ("siglip_rows_kernel", "siglip_finalize_kernel", "siglip_scale_kernel"),
}  # fmt: skip


def _replace(src: str, old: str, new: str, what: str) -> str:
    assert old in src, f"{what} changed: {old!r} not found (update tests/emulation/build.py)"
    return src.replace(old, new)


def _code_positions(src: str, token: str):
    """Start offsets of ``token`` outside // comments."""
    for m in re.finditer(re.escape(token), src):
        line_start = src.rfind("\n", 0, m.start()) + 1
        if "//" not in src[line_start : m.start()]:
            yield m.start()


def _matching(src: str, open_pos: int, open_ch: str = "(", close_ch: str = ")") -> int:
    depth = 0
    for i in range(open_pos, len(src)):
        if src[i] == open_ch:
            depth += 1
        elif src[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced {open_ch} at offset {open_pos}")


def _first_arg(args: str) -> str:
    depth = 0
    for i, c in enumerate(args):
        if c in "(<":
            depth += 1
        elif c in ")>":
            depth -= 1
        elif c == "," and depth == 0:
            return args[:i].strip()
    return args.strip()


def rewrite_launch_bounds(src: str) -> tuple[str, int]:
    """``__launch_bounds__(B, ...)`` removed; ``::so_emu::check_launch_bounds(int(B));`` opens the kernel body."""
    count = 0
    while True:
        pos = next(_code_positions(src, "__launch_bounds__("), None)
        if pos is None:
            return src, count
        open_pos = pos + len("__launch_bounds__")
        close = _matching(src, open_pos)
        bound = _first_arg(src[open_pos + 1 : close])
        body = src.index("{", close)
        src = (
            src[:pos] + src[close + 1 : body + 1]
            + f" ::so_emu::check_launch_bounds(int({bound}));" + src[body + 1 :]
        )  # fmt: skip
        count += 1


def rewrite_launches(src: str) -> tuple[str, list[str]]:
    """``kernel<...><<<grid, block, smem, stream>>>(args)`` → ``so_emu::launch("kernel", &kernel<...>, grid, block,
    smem, stream)(args)``. The kernel expression is the statement text before ``<<<`` (comment lines dropped)."""
    out, pos, names = [], 0, []
    for i in _code_positions(src, "<<<"):
        start = max(src.rfind(";", 0, i), src.rfind("{", 0, i), src.rfind("}", 0, i)) + 1
        kernel = " ".join(ln for ln in src[start:i].splitlines() if not ln.strip().startswith("//")).strip()
        assert re.fullmatch(r"[\w:<>, ()]+", kernel), f"unexpected launch expression: {kernel!r}"
        name = re.match(r"\w+", kernel).group(0)
        j = src.index(">>>", i)
        out += [src[pos:start], f'\n ::so_emu::launch("{name}", &{kernel}, {src[i + 3 : j]})']
        pos = j + 3
        names.append(name)
    out.append(src[pos:])
    return "".join(out), names


def translate_common() -> str:
    common = (CUDA_DIR / "common.cuh").read_text()
    for old, new in (
        ("#include <cuda_runtime.h>", ""),
        ("#include <c10/cuda/CUDAStream.h>", ""),
        ("#include <c10/cuda/CUDACachingAllocator.h>", ""),  # the shim's getDeviceStats stands in
        ("c10::cuda::getCurrentCUDAStream(t.device().index()).stream()", "nullptr"),
    ):
        common = _replace(common, old, new, "csrc/cuda/common.cuh")
    return common


def _control(name: str) -> str:
    return f"""
namespace {{
void so_emu_configure(int64_t order, int64_t seed, int64_t block, std::string block_kernels, int64_t grid,
                      std::string grid_kernels, bool poison) {{
  auto& c = ::so_emu::g_rt.cfg;
  c.order = int(order);
  c.seed = uint64_t(seed);
  c.block = int(block);
  c.block_kernels = "," + block_kernels + ",";
  c.grid = int(grid);
  c.grid_kernels = "," + grid_kernels + ",";
  c.poison = poison;
}}
std::vector<int64_t> so_emu_stats() {{
  const auto& s = ::so_emu::g_rt.stats;
  return {{s.launches, s.blocks, s.threads, s.switches, s.overridden, s.clamped, s.max_block, s.max_overridden}};
}}
void so_emu_reset_stats() {{ ::so_emu::g_rt.stats = {{}}; }}
std::string so_emu_kernel_blocks() {{
  std::string out;
  for (const auto& [k, v] : ::so_emu::g_rt.stats.kernel_block) out += k + "=" + std::to_string(v) + ";";
  return out;
}}
}}  // namespace
TORCH_LIBRARY_FRAGMENT(so_emu_{name}, m) {{
  m.def("emu_configure(int order, int seed, int block, str block_kernels, int grid, str grid_kernels, bool poison) -> ()",
        &so_emu_configure);
  m.def("emu_stats() -> int[]", &so_emu_stats);
  m.def("emu_reset_stats() -> ()", &so_emu_reset_stats);
  m.def("emu_kernel_blocks() -> str", &so_emu_kernel_blocks);
}}
"""


def translate(name: str) -> str:
    """The emulation source of csrc/cuda/<name>_cuda.cu (to be compiled with -I<folder of common_emu.cuh>)."""
    what = f"csrc/cuda/{name}_cuda.cu"
    src = (CUDA_DIR / f"{name}_cuda.cu").read_text()
    src = _replace(src, '#include "common.cuh"', '#include "common_emu.cuh"', what)
    src = _replace(src, '#include "../common/', f'#include "{ROOT / "csrc" / "common"}/', what)
    src = _replace(src, "TORCH_LIBRARY_IMPL(structure_ops, CUDA, m)", f"TORCH_LIBRARY(so_emu_{name}, m)", what)
    src = _replace(src, "m.impl(", "m.def(", what)
    src, n = re.subn(r"\b\w+\.is_cuda\(\)", "true", src)
    assert n >= 1, f"{what} changed: no device check x.is_cuda() found"
    src = _replace(src, "at::empty(", "::so_emu::empty(", what)
    src = src.replace("at::mm_out(", "::so_emu::mm_out(").replace("at::addmm_out(", "::so_emu::addmm_out(")
    src = re.sub(r"#include <(c10/cuda/[^>]*|cuda_bf16\.h|cuda_fp16\.h|cuda_runtime\.h)>", "", src)
    src, bounds = rewrite_launch_bounds(src)
    assert bounds >= 1, f"{what}: no __launch_bounds__ found"
    src, names = rewrite_launches(src)
    missing = set(KERNELS[name]) - set(names)
    assert not missing, f"{what}: no launch of {sorted(missing)} found"
    header = "#define SO_EMU_WITH_TORCH 1\n" f'#include "{SHIM}"\n'
    return header + src + _control(name)


class Emulated:
    """One emulated build: ``ops`` (torch.ops.so_emu_<name>), ``schedule`` and ``stats``."""

    def __init__(self, name: str, ops, build_seconds: float):
        self.name = name
        self.ops = ops
        self.build_seconds = build_seconds

    @contextlib.contextmanager
    def schedule(self, order: str = "inorder", seed: int = 0, block: int | None = None, grid: int | None = None,
                 poison: bool = True):  # fmt: skip
        """Run the ops inside with blocks and threads in ``order`` (``ORDERS``; "shuffled" draws from ``seed``),
        the block-generic kernels (``BLOCK_GENERIC``) at ``block`` threads (clamped to each kernel's
        __launch_bounds__) and the grid-stride kernels at ``grid`` blocks."""
        self.ops.emu_configure(
            ORDERS.index(order), seed, block or 0, ",".join(BLOCK_GENERIC[self.name]), grid or 0,
            ",".join(GRID_STRIDE[self.name]), poison,
        )  # fmt: skip
        try:
            yield self
        finally:
            self.ops.emu_configure(0, 0, 0, "", 0, "", True)

    def stats(self) -> dict[str, int]:
        keys = ("launches", "blocks", "threads", "switches", "overridden", "clamped", "max_block", "max_overridden")
        return dict(zip(keys, self.ops.emu_stats(), strict=True))

    def kernel_blocks(self) -> dict[str, int]:
        """Per kernel that ran since the last reset_stats(): the largest block (threads) it ran with."""
        pairs = [p.split("=") for p in self.ops.emu_kernel_blocks().split(";") if p]
        return {k: int(v) for k, v in pairs}

    def reset_stats(self) -> None:
        self.ops.emu_reset_stats()


def compiler_problem() -> str | None:
    """Why an emulated build cannot run here (None when it can)."""
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX)"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is needed to build the emulation"
    return None


_TMP: list[pathlib.Path] = []


def _build_root() -> pathlib.Path:
    """STRUCTURE_OPS_EMU_BUILD_DIR (kept: ninja rebuilds only what changed) or a temporary folder per process."""
    env = os.environ.get("STRUCTURE_OPS_EMU_BUILD_DIR")
    if env:
        path = pathlib.Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if not _TMP:
        _TMP.append(pathlib.Path(tempfile.mkdtemp(prefix="so_cuda_emu_")))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _build(name: str) -> Emulated:
    import torch
    from torch.utils import cpp_extension

    assert name in NAMES, name
    dest = _build_root() / name
    dest.mkdir(parents=True, exist_ok=True)
    _write_if_changed(dest / "common_emu.cuh", translate_common())
    src = dest / f"{name}_emu.cpp"
    _write_if_changed(src, translate(name))
    t0 = time.perf_counter()
    cpp_extension.load(
        name=f"so_emu_{name}", sources=[str(src)], build_directory=str(dest), is_python_module=False,
        extra_cflags=["-O1", "-std=c++20", f"-I{dest}", "-fvisibility=hidden", "-Wno-unknown-pragmas"],
    )  # fmt: skip
    return Emulated(name, getattr(torch.ops, f"so_emu_{name}"), time.perf_counter() - t0)


_LOCK = threading.Lock()
_FUTURES: dict[str, concurrent.futures.Future] = {}
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []


def prebuild(names) -> None:
    """Start compiling ``names`` in the background, two at a time (the test session calls this once it knows which
    emulated builds its tests need; ``build`` then waits for the result)."""
    with _LOCK:
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="so_emu_build"))
        for name in names:
            if name not in _FUTURES:
                _FUTURES[name] = _POOL[0].submit(_build, name)


def build(name: str) -> Emulated:
    """Compile the emulation of csrc/cuda/<name>_cuda.cu (once per process) and load its ops."""
    with _LOCK:
        fut = _FUTURES.get(name)
        if fut is None:
            fut = _FUTURES[name] = concurrent.futures.Future()
            owner = True
        else:
            owner = False
    if owner:
        try:
            fut.set_result(_build(name))
        except BaseException as e:
            fut.set_exception(e)
    return fut.result()


@functools.cache
def build_selftest():
    """tests/emulation/selftest.cu through the same rewrite, compiled without torch and loaded with ctypes."""
    import ctypes
    import subprocess

    dest = _build_root() / "selftest"
    dest.mkdir(parents=True, exist_ok=True)
    _write_if_changed(dest / "common_emu.cuh", translate_common())
    src, _ = rewrite_launch_bounds((HERE / "selftest.cu").read_text())
    src, _ = rewrite_launches(src)
    src = src.replace('#include "common_emu.cuh"', f'#include "{SHIM}"\n#include "common_emu.cuh"', 1)
    cpp = dest / "selftest_emu.cpp"
    _write_if_changed(cpp, src)
    lib = dest / "libso_emu_selftest.so"
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas",
           f"-I{dest}", str(cpp), "-o", str(lib)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    so.so_emu_selftest.restype = ctypes.c_int
    so.so_emu_selftest.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]  # fmt: skip
    so.so_emu_selftest_max_block.restype = ctypes.c_longlong
    return so

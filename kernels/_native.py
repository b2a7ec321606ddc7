"""The native CPU conv kernel: ``_native.c`` built on first use with the system C compiler, loaded with ctypes.

``sparse_conv`` computes a conv only at the active output pixels, straight from the input (no patch
matrix): the float32 ``cpu`` route of ``sparse_conv2d`` and of ``block_conv2d`` (NCHW, groups=1).
The library is compiled once per source version, flags, compiler and CPU (``$CC``, else ``cc``) into
``$DYNNET_CACHE`` (default ``~/.cache/dynnet``) and loaded lazily: importing ``kernels`` builds
nothing, and the GPU machines need no compiler. Where no compiler is found, the build fails or the
CPU lacks AVX-512, the ops use their pure-PyTorch routes (same results, slower). ``DYNNET_NATIVE=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_native.c")
ENV_SWITCH = "DYNNET_NATIVE"

# -march=native: the build is cached per CPU (AVX-512 where the CPU has it). The kernel is written
# with intrinsics; auto-vectorization is off (it made the address loops worse).
# -fopenmp: parallel loops on the OpenMP runtime torch has already loaded (the library's libgomp.so.1
# resolves to torch's copy); a compiler without OpenMP gets a second try without it (POSIX threads).
CFLAGS = os.environ.get("DYNNET_NATIVE_CFLAGS", "-O3 -march=native -fno-tree-vectorize").split() + [
    "-fPIC", "-shared", "-pthread"]
OPENMP = ["-fopenmp"]

# MACs below which the fused conv runs on one thread.
PARALLEL_MACS = int(os.environ.get("DYNNET_NATIVE_PARALLEL_MACS", 500_000))

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def enabled() -> bool:
    """False when ``DYNNET_NATIVE=0`` (the pure-PyTorch routes run instead)."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")


def _cpu_tag() -> str:
    """The CPU's model and flags (the build uses ``-march=native``, so a cached build is per CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str, flags: list[str]) -> Path:
    """Compile ``_native.c`` into the cache (atomic rename, so concurrent builders do not collide)."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode() + _cpu_tag().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DYNNET_CACHE", Path.home() / ".cache" / "dynnet"))
    target = cache / f"dynnet_native_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *flags, str(SOURCE), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(built, target)
    return target


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    library.sparse_conv_f32.argtypes = [_PTR] + [_I64] * 4 + [_PTR] + [_I64] * 10 + [_PTR, _I64, _I64, _PTR, _PTR,
                                                                                  _I64, _I64, _I64, ctypes.c_int]
    library.sparse_conv_f32.restype = ctypes.c_int
    library.has_sparse_conv.restype = ctypes.c_int
    library.routed_linear_f32.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int]
    library.routed_linear_f32.restype = ctypes.c_int
    return library


def lib() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when disabled or unavailable (warned once)."""
    if not enabled():
        return None
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            library = None
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            try:
                if compiler is None:
                    raise RuntimeError("no C compiler found (set CC)")
                try:
                    path = _build(compiler, CFLAGS + OPENMP)
                except RuntimeError:
                    path = _build(compiler, CFLAGS)
                library = _declare(ctypes.CDLL(str(path)))
            except (OSError, RuntimeError, AttributeError) as error:
                warnings.warn(f"kernels: native CPU kernel unavailable, using PyTorch routes ({error})", stacklevel=2)
            _STATE["lib"] = library
    return _STATE["lib"]  # type: ignore[return-value]


def usable(*tensors: Tensor) -> bool:
    """True when the fused kernel serves these tensors: float32 on the CPU, library built for AVX-512."""
    for t in tensors:  # (a loop of cheap attribute reads: this runs on every sparse conv call)
        if t.dtype != torch.float32 or not t.is_cpu:
            return False
    if not enabled():
        return False
    built = _STATE.get("avx512")  # asked once: a ctypes call costs microseconds on every sparse conv
    if built is None:
        library = lib()
        built = _STATE["avx512"] = library is not None and bool(library.has_sparse_conv())
    return bool(built)


def sparse_conv(x: Tensor, mask: Tensor, g, wt: Tensor, bias: Tensor | None, out: Tensor, nhwc: bool = False,
                block_size: int = 0, accumulate: bool = False) -> bool:
    """Fused direct conv at the outputs where ``mask`` is true, 0 elsewhere; False where not built for it.
    Call it once ``usable`` (or ``lib``) has found the library.

    x ``(N, Cin, H, W)`` and out ``(N, Cout, Hout, Wout)`` both contiguous, or both channels_last when
    ``nhwc``; mask bool ``(N, Hout, Wout)`` contiguous, or with ``block_size > 0`` a block mask
    ``(N, ceil(Hout/B), ceil(Wout/B))`` (an output is active when its block is); wt: ``pack_conv``'s
    column blocks; bias ``(Cout16,)`` or None. Every element of ``out`` is written; with ``accumulate``,
    ``out`` holds a residual that the conv is added to at the active outputs (the rest is left as it is).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    co16 = wt.numel() // (g.in_channels * kh * kw)
    macs = g.batch * g.out_height * g.out_width * wt.numel()  # an upper bound (every output active): threads
    done = _STATE["lib"].sparse_conv_f32(  # (lib() reads the environment on every call)
        x.data_ptr(), g.batch, g.in_channels, g.height, g.width, mask.data_ptr(), g.out_height, g.out_width,
        kh, kw, sh, sw, ph, pw, dh, dw, wt.data_ptr(), g.out_channels, co16,
        None if bias is None else bias.data_ptr(), out.data_ptr(), int(nhwc), block_size, int(accumulate),
        1 if macs < PARALLEL_MACS else max(1, torch.get_num_threads()))
    return bool(done)


def routed_linear(x: Tensor, route: Tensor, wt: Tensor, bias: Tensor | None, out: Tensor) -> bool:
    """``out[t] = x[t] @ wt[route[t]] (+ bias[route[t]])`` by the native kernel; False where not built.
    Call it once ``usable`` (or ``lib``) has found the library.

    x ``(T, Cin)`` contiguous; route ``(T,)`` int64; wt ``(E, Cin*Cout16)`` (``pack_routed``); bias
    ``(E, Cout16)`` or None; out ``(T, Cout)``, every row written. A route value outside ``[0, E)``
    raises ``ValueError`` before anything is written.
    """
    tokens, cin = x.shape
    co16 = wt.shape[1] // cin
    macs = tokens * cin * co16
    done = _STATE["lib"].routed_linear_f32(  # (lib() reads the environment on every call)
        x.data_ptr(), tokens, cin, route.data_ptr(), wt.shape[0], wt.data_ptr(),
        None if bias is None else bias.data_ptr(), out.shape[1], co16, out.data_ptr(),
        1 if macs < PARALLEL_MACS else max(1, torch.get_num_threads()))
    if done < 0:
        raise ValueError(f"route: values must lie in [0, {wt.shape[0]})")
    return bool(done)


# --------------------------------------------------------------------------------------------------
# Weights in the kernels' layout, packed once per weight version


def _anchor(t: Tensor | None) -> Tensor | None:
    """The tensor that owns ``t``'s memory: its base for a view (a module's Parameter), else itself."""
    return None if t is None else (t._base if t._base is not None else t)


class _Packed(threading.local):
    """Per-thread LRU of packed weights.

    ``size`` holds every sparse conv of a deep network (ResNet-101's branches alone have 99 convs), or of
    a dense and a dynamic model side by side: with fewer entries than convs per forward, an LRU evicts
    each weight before its next use and every call packs again.
    """

    size = 512

    def __init__(self) -> None:
        self.items: OrderedDict[tuple, tuple[Tensor, Tensor | None, tuple]] = OrderedDict()


_PACKED = _Packed()


def packed(weight: Tensor, bias: Tensor | None,
           pack: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """``pack(weight, bias)``, cached until the weight or bias changes.

    The key holds their addresses, layouts and version counters (bumped by in-place updates such as
    an optimizer step); a hit also needs the tensors owning that memory to be the same live objects
    (weak references), so memory freed and reused by another tensor of the same shape is never
    mistaken for the cached one. Inference tensors have no version counter (in-place edits inside
    ``torch.inference_mode`` go unseen), so they are packed on every call instead.
    """
    if weight.is_inference() or (bias is not None and bias.is_inference()):
        with torch.no_grad():
            return pack(weight.detach(), None if bias is None else bias.detach())
    key = (pack, weight.data_ptr(), weight._version, weight.shape, weight.stride(), weight.dtype,
           None if bias is None else (bias.data_ptr(), bias._version, bias.stride()))
    items = _PACKED.items
    hit = items.get(key)
    if hit is not None:
        w_ref, b_ref = hit[2]
        if w_ref() is _anchor(weight) and (bias is None or b_ref() is _anchor(bias)):
            items.move_to_end(key)  # most recently used
            return hit[0], hit[1]
    with torch.no_grad():
        wt, bt = pack(weight.detach(), None if bias is None else bias.detach())
    owners = (_anchor(weight), _anchor(bias))
    items[key] = (wt, bt, tuple(weakref.ref(o) if o is not None else None for o in owners))
    items.move_to_end(key)
    while len(items) > _PACKED.size:
        items.popitem(last=False)
    return wt, bt


# Output channels per register tile (16 * TILE_VECTORS in _native.c): the packed weights' column block.
BLOCK_COLUMNS = 64


def column_blocks(w_t: Tensor) -> Tensor:
    """``w_t (..., K, Cout16)`` as ``(..., K * Cout16)``: column blocks of ``BLOCK_COLUMNS`` (the last one
    narrower), each ``(K, width)`` contiguous, one after the other; the kernel's weight layout."""
    blocks = [b.reshape(*w_t.shape[:-2], -1) for b in w_t.split(BLOCK_COLUMNS, dim=-1)]
    return torch.cat(blocks, dim=-1).contiguous()


def pack_conv(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Conv weight ``(Cout, Cin, kh, kw)`` as column blocks of ``(Cin*kh*kw, Cout16)`` (zero padded to 16),
    flat ``(Cin*kh*kw * Cout16,)``; bias as ``(Cout16,)``."""
    cout = weight.shape[0]
    pad = -cout % 16
    wt = column_blocks(torch.nn.functional.pad(weight.reshape(cout, -1).t(), (0, pad)))
    return wt, None if bias is None else torch.nn.functional.pad(bias, (0, pad)).contiguous()


def pack_routed(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Expert weights ``(E, Cout, Cin)`` as ``(E, Cin * Cout16)`` (column blocks of each ``(Cin, Cout16)``),
    biases ``(E, Cout)`` as ``(E, Cout16)``."""
    pad = -weight.shape[1] % 16
    wt = column_blocks(torch.nn.functional.pad(weight.transpose(1, 2), (0, pad)))
    return wt, None if bias is None else torch.nn.functional.pad(bias, (0, pad)).contiguous()

"""The sampler's per-pair work, fused: gather a neighbour's term, add its anchor's, ReLU, LayerNorm, pool.

For every region r, anchor s and neighbour j of the sampler's point hierarchy::

    h[r, s, j]   = u[r, nb[r, s, j]] + v[r, s]                  # [C]
    y[r, s, j]   = LayerNorm(relu(h[r, s, j])) * weight + bias   # over the C channels
    out[r, s]    = max_j y[r, s, j]   (or the mean over j)

``pair_pool`` computes ``out`` without ever holding the [R, S, k, C] pair tensor: the forward keeps, for max pooling,
only which neighbour won each channel (one byte per output value), and the backward recomputes each pair's
activations from ``u`` and ``v`` and scatters its gradient straight into ``grad_u`` (no per-chunk zero gradient).
Gradients follow ``torch.max``'s convention: the first maximal neighbour of a channel receives all of its gradient.

Two implementations with the same contract:

* a C++ kernel for CPU tensors, one pass over each pair in L1 cache, threads split by region so it is deterministic
  for a given thread count. It is compiled on first use with the system's C++ compiler (``$CXX`` or ``g++``,
  about two seconds) into ``$FERRET_KERNEL_CACHE`` (default ``~/.cache/ferret/kernels``) and loaded with ``ctypes``;
  it needs no PyTorch headers;
* plain PyTorch over chunks of regions, used on other devices, when no compiler is found, or when
  ``FERRET_SAMPLER_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["kernel_available", "pair_pool"]

# Pair activations ([regions, S, k, C] elements) the PyTorch fallback materialises at once.
_FALLBACK_CHUNK_ELEMENTS = {"cpu": 1 << 24, "other": 1 << 28}

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

struct Shape { int64_t R, P, S, K, C; };

inline float relu(float x) { return x > 0.f ? x : 0.f; }

// h = u + v; returns mean and 1/sqrt(var + eps) of relu(h) over the C channels (LayerNorm's biased variance).
inline void pair_stats(const float* __restrict u, const float* __restrict v, float* __restrict h, int64_t C, float eps, float* mean, float* rstd) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) {
    h[c] = u[c] + v[c];
    sum += relu(h[c]);
  }
  const float m = sum / static_cast<float>(C);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) {
    const float d = relu(h[c]) - m;
    sq += d * d;
  }
  *mean = m;
  *rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
}

void forward_regions(const float* u, const float* v, const int64_t* nb, const float* __restrict w,
                     const float* __restrict b, float eps, bool max_mode, Shape d, int64_t r0, int64_t r1, float* out,
                     uint8_t* arg) {
  std::vector<float> hbuf(d.C), best_buf(d.C), which_buf(d.C);
  float* __restrict h = hbuf.data();
  float* __restrict best = best_buf.data();
  float* __restrict which = which_buf.data();  // the winning neighbour, as a float so the loop vectorises
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t row = r * d.S + s;
      const float* vr = v + row * d.C;
      const float start = max_mode ? -INFINITY : 0.f;
      for (int64_t c = 0; c < d.C; ++c) {
        best[c] = start;
        which[c] = 0.f;
      }
      for (int64_t j = 0; j < d.K; ++j) {
        const float* ur = u + (r * d.P + nb[row * d.K + j]) * d.C;
        float mean, rstd;
        pair_stats(ur, vr, h, d.C, eps, &mean, &rstd);
        if (max_mode) {
          const float fj = static_cast<float>(j);
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) {
            const float y = (relu(h[c]) - mean) * rstd * w[c] + b[c];
            const bool better = y > best[c];  // strict: the first maximal neighbour wins
            best[c] = better ? y : best[c];
            which[c] = better ? fj : which[c];
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) best[c] += (relu(h[c]) - mean) * rstd * w[c] + b[c];
        }
      }
      float* o = out + row * d.C;
      const float scale = max_mode ? 1.f : 1.f / static_cast<float>(d.K);
      for (int64_t c = 0; c < d.C; ++c) o[c] = best[c] * scale;
      if (max_mode) {
        uint8_t* a = arg + row * d.C;
        for (int64_t c = 0; c < d.C; ++c) a[c] = static_cast<uint8_t>(which[c]);
      }
    }
  }
}

void backward_regions(const float* u, const float* v, const int64_t* nb, const float* w, const float* g,
                      const uint8_t* arg, float eps, bool max_mode, Shape d, int64_t r0, int64_t r1, float* gu,
                      float* gv, float* gw, float* gb) {
  std::vector<float> h(d.C), xh(d.C), dxh(d.C);
  const float inv_k = 1.f / static_cast<float>(d.K);
  const float inv_c = 1.f / static_cast<float>(d.C);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t row = r * d.S + s;
      const float* vr = v + row * d.C;
      const float* gr = g + row * d.C;
      const uint8_t* a = arg ? arg + row * d.C : nullptr;
      float* gvr = gv ? gv + row * d.C : nullptr;
      for (int64_t j = 0; j < d.K; ++j) {
        const int64_t idx = nb[row * d.K + j];
        const float* ur = u + (r * d.P + idx) * d.C;
        float mean, rstd;
        pair_stats(ur, vr, h.data(), d.C, eps, &mean, &rstd);
        float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t c = 0; c < d.C; ++c) {
          const float x = (relu(h[c]) - mean) * rstd;
          const float dy = max_mode ? (a[c] == j ? gr[c] : 0.f) : gr[c] * inv_k;
          gw[c] += dy * x;
          gb[c] += dy;
          const float dx = dy * w[c];
          xh[c] = x;
          dxh[c] = dx;
          s1 += dx;
          s2 += dx * x;
        }
        const float m1 = s1 * inv_c, m2 = s2 * inv_c;
#pragma omp simd
        for (int64_t c = 0; c < d.C; ++c) dxh[c] = h[c] > 0.f ? rstd * (dxh[c] - m1 - xh[c] * m2) : 0.f;
        if (gu) {
          float* gur = gu + (r * d.P + idx) * d.C;
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) gur[c] += dxh[c];
        }
        if (gvr) {
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) gvr[c] += dxh[c];
        }
      }
    }
  }
}

template <typename Fn>
void split_regions(int64_t R, int threads, Fn fn) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, R));
  if (n == 1) {
    fn(0, 0, R);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t r0 = R * t / n, r1 = R * (t + 1) / n;
    pool.emplace_back([=] { fn(t, r0, r1); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

int ferret_pair_pool_forward(const float* u, const float* v, const int64_t* nb, const float* w, const float* b,
                             float eps, int max_mode, int64_t R, int64_t P, int64_t S, int64_t K, int64_t C,
                             int threads, float* out, uint8_t* arg) {
  const Shape d{R, P, S, K, C};
  split_regions(R, threads, [&](int64_t, int64_t r0, int64_t r1) {
    forward_regions(u, v, nb, w, b, eps, max_mode != 0, d, r0, r1, out, arg);
  });
  return 0;
}

// gu (R*P*C), gv (R*S*C): zero-filled by the caller, or null when not needed. gw, gb: [C], overwritten.
int ferret_pair_pool_backward(const float* u, const float* v, const int64_t* nb, const float* w, const float* g,
                              const uint8_t* arg, float eps, int max_mode, int64_t R, int64_t P, int64_t S,
                              int64_t K, int64_t C, int threads, float* gu, float* gv, float* gw, float* gb) {
  const Shape d{R, P, S, K, C};
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, R));
  std::vector<float> part_w(n * C, 0.f), part_b(n * C, 0.f);
  split_regions(R, threads, [&](int64_t t, int64_t r0, int64_t r1) {
    backward_regions(u, v, nb, w, g, arg, eps, max_mode != 0, d, r0, r1, gu, gv, part_w.data() + t * C,
                     part_b.data() + t * C);
  });
  for (int64_t c = 0; c < C; ++c) {
    float sw = 0.f, sb = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      sw += part_w[t * C + c];
      sb += part_b[t * C + c];
    }
    gw[c] = sw;
    gb[c] = sb;
  }
  return 0;
}

}  // extern "C"
"""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False


def _cache_dir() -> Path:
    configured = os.environ.get("FERRET_KERNEL_CACHE")
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "ferret" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "ferret-kernels"


def _cpu_signature() -> str:
    """Source + compiler + CPU flags: the build uses -march=native, so a cache shared by other CPUs must not match."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return "\n".join([_SOURCE, platform.machine(), flags])


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256((_cpu_signature() + compiler + version).encode()).hexdigest()[:16]
    directory = _cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"ferret_pair_pool_{digest}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            source = Path(tmp) / "pair_pool.cpp"
            source.write_text(_SOURCE)
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread",
                   str(source), "-o", str(built)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"compiling the pair-pool kernel failed: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)  # atomic: concurrent builders never see a half-written library
    library = ctypes.CDLL(str(target))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.ferret_pair_pool_forward.argtypes = [pointer] * 5 + [ctypes.c_float, ctypes.c_int] + [i64] * 5 + [
        ctypes.c_int, pointer, pointer]
    library.ferret_pair_pool_backward.argtypes = [pointer] * 6 + [ctypes.c_float, ctypes.c_int] + [i64] * 5 + [
        ctypes.c_int] + [pointer] * 4
    return library


def _kernel() -> ctypes.CDLL | None:
    global _library, _load_failed
    if os.environ.get("FERRET_SAMPLER_KERNEL", "1") == "0":
        return None
    if _library is not None or _load_failed:
        return _library
    with _lock:
        if _library is None and not _load_failed:
            try:
                _library = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _load_failed = True
                logger.warning("sampler C++ kernel unavailable, using the PyTorch path: %s", err)
    return _library


def kernel_available() -> bool:
    """Whether CPU tensors go through the C++ kernel (building it on first call)."""
    return _kernel() is not None


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch path
# ---------------------------------------------------------------------------------------------------------------


def _chunk_regions(u: torch.Tensor, num_anchors: int, k: int) -> int:
    budget = _FALLBACK_CHUNK_ELEMENTS["cpu" if u.device.type == "cpu" else "other"]
    return max(1, budget // (num_anchors * k * u.shape[-1]))


def _pairs(u_flat: torch.Tensor, v: torch.Tensor, flat_nb: torch.Tensor) -> torch.Tensor:
    """[r*S*k] indices into u_flat [R*P, C], v [r, S, C] -> h [r, S, k, C]."""
    r, s, c = v.shape
    return u_flat.index_select(0, flat_nb).view(r, s, -1, c).add_(v[:, :, None, :])


def _torch_forward(u, v, nb, weight, bias, eps, max_mode):
    num_regions, num_points, channels = u.shape
    _, num_anchors, k = nb.shape
    u_flat = u.reshape(-1, channels)
    flat_nb = (nb + torch.arange(num_regions, device=nb.device)[:, None, None] * num_points).reshape(num_regions, -1)
    out = u.new_empty(num_regions, num_anchors, channels)
    arg = torch.empty(num_regions, num_anchors, channels, dtype=torch.uint8, device=u.device) if max_mode else None
    step = _chunk_regions(u, num_anchors, k)
    for start in range(0, num_regions, step):
        part = slice(start, start + step)
        hidden = _pairs(u_flat, v[part], flat_nb[part].reshape(-1)).relu_()
        hidden = F.layer_norm(hidden, (channels,), weight, bias, eps)
        if max_mode:
            best = hidden.max(dim=2)  # first maximal index on ties
            out[part], arg[part] = best.values, best.indices.to(torch.uint8)
        else:
            out[part] = hidden.mean(dim=2)
    return out, arg


def _torch_backward(u, v, nb, weight, grad_out, arg, eps, max_mode, need_u, need_v):
    num_regions, num_points, channels = u.shape
    _, num_anchors, k = nb.shape
    u_flat = u.reshape(-1, channels)
    flat_nb = (nb + torch.arange(num_regions, device=nb.device)[:, None, None] * num_points).reshape(num_regions, -1)
    grad_u = torch.zeros_like(u_flat) if need_u else None
    grad_v = torch.empty_like(v) if need_v else None
    grad_w = torch.zeros(channels, dtype=torch.float32, device=u.device)
    grad_b = grad_out.sum(dim=(0, 1))
    step = _chunk_regions(u, num_anchors, k)
    for start in range(0, num_regions, step):
        part = slice(start, start + step)
        index = flat_nb[part].reshape(-1)
        hidden = _pairs(u_flat, v[part], index)
        z = hidden.clamp(min=0)
        var, mean = torch.var_mean(z, dim=-1, correction=0, keepdim=True)
        xhat = (z - mean).mul_(torch.rsqrt(var + eps))
        g = grad_out[part][:, :, None, :]
        if max_mode:
            dy = torch.zeros_like(z).scatter_(2, arg[part][:, :, None, :].long(), g)
        else:
            dy = (g / k).expand_as(z)
        grad_w += (dy * xhat).sum(dim=(0, 1, 2))
        dx = dy * weight
        dz = dx - dx.mean(-1, keepdim=True) - xhat * (dx * xhat).mean(-1, keepdim=True)
        dh = dz.mul_(torch.rsqrt(var + eps)).mul_(hidden > 0)
        if need_v:
            grad_v[part] = dh.sum(dim=2)
        if need_u:
            grad_u.index_add_(0, index, dh.reshape(-1, channels))
    return (grad_u.view_as(u) if need_u else None), grad_v, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


class _PairPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v, nb, weight, bias, eps, max_mode, use_kernel):
        library = _kernel() if use_kernel and u.device.type == "cpu" else None
        num_regions, num_points, channels = u.shape
        _, num_anchors, k = nb.shape
        if library is not None:
            out = u.new_empty(num_regions, num_anchors, channels)
            arg = torch.empty(out.shape, dtype=torch.uint8) if max_mode else None
            library.ferret_pair_pool_forward(
                _ptr(u), _ptr(v), _ptr(nb), _ptr(weight), _ptr(bias), eps, int(max_mode),
                num_regions, num_points, num_anchors, k, channels, torch.get_num_threads(), _ptr(out), _ptr(arg))
        else:
            out, arg = _torch_forward(u, v, nb, weight, bias, eps, max_mode)
        ctx.save_for_backward(u, v, nb, weight, arg)
        ctx.eps, ctx.max_mode, ctx.library = eps, max_mode, library
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, v, nb, weight, arg = ctx.saved_tensors
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.float().contiguous()
        library = ctx.library
        if library is None:
            grad_u, grad_v, grad_w, grad_b = _torch_backward(
                u, v, nb, weight, grad_out, arg, ctx.eps, ctx.max_mode, need_u, need_v)
        else:
            num_regions, num_points, channels = u.shape
            _, num_anchors, k = nb.shape
            grad_u = torch.zeros_like(u) if need_u else None
            grad_v = torch.zeros_like(v) if need_v else None
            grad_w = torch.empty(channels)
            grad_b = torch.empty(channels)
            library.ferret_pair_pool_backward(
                _ptr(u), _ptr(v), _ptr(nb), _ptr(weight), _ptr(grad_out), _ptr(arg), ctx.eps, int(ctx.max_mode),
                num_regions, num_points, num_anchors, k, channels, torch.get_num_threads(),
                _ptr(grad_u), _ptr(grad_v), _ptr(grad_w), _ptr(grad_b))
        return grad_u, grad_v, None, grad_w, grad_b, None, None, None


def pair_pool(
    u: torch.Tensor,
    v: torch.Tensor,
    neighbor_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    mode: str = "max",
    use_kernel: bool = True,
) -> torch.Tensor:
    """Pooled LayerNorm(ReLU(u[neighbour] + v[anchor])) of every anchor, computed in fp32.

    Args:
        u: [R, P, C] per-point terms.
        v: [R, S, C] per-anchor terms.
        neighbor_index: [R, S, k] long, indices into P; k <= 255.
        weight, bias: [C] LayerNorm affine parameters; eps its epsilon.
        mode: "max" or "mean" over the k neighbours.
        use_kernel: allow the C++ kernel for CPU tensors (False forces the PyTorch path).

    Returns:
        [R, S, C] float32. Differentiable in u, v, weight and bias.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
    if u.dim() != 3 or v.dim() != 3 or neighbor_index.dim() != 3:
        raise ValueError(
            f"u [R, P, C], v [R, S, C] and neighbor_index [R, S, k] expected, got {tuple(u.shape)}, "
            f"{tuple(v.shape)}, {tuple(neighbor_index.shape)}"
        )
    if v.shape[0] != u.shape[0] or v.shape[2] != u.shape[2] or neighbor_index.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"shapes disagree: u {tuple(u.shape)}, v {tuple(v.shape)}, neighbor_index {tuple(neighbor_index.shape)}"
        )
    if not 0 < neighbor_index.shape[2] <= 255:
        raise ValueError(f"between 1 and 255 neighbours are supported, got {neighbor_index.shape[2]}")
    return _PairPool.apply(
        u.float().contiguous(),
        v.float().contiguous(),
        neighbor_index.long().contiguous(),
        weight.float().contiguous(),
        bias.float().contiguous(),
        float(eps),
        mode == "max",
        use_kernel,
    )

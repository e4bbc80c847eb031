"""The sampler's per-pair work, fused: gather a neighbour's term, add its anchor's, ReLU, LayerNorm, pool.

For every region r, anchor s and neighbour j of the sampler's point hierarchy::

    h[r, s, j]   = u[r, nb[r, s, j]] + v[r, s]                  # [C]
    y[r, s, j]   = LayerNorm(relu(h[r, s, j])) * weight + bias   # over the C channels
    out[r, s]    = max_j y[r, s, j]   (or the mean over j)

``pair_pool`` computes ``out`` without ever holding the [R, S, k, C] pair tensor: the forward keeps, for max pooling,
only which neighbour won each channel (one byte per output value), and the backward recomputes each pair's
activations from ``u`` and ``v`` and adds its gradient straight into the gradient of ``u`` (no per-chunk zero
gradient of the whole ``u``). Gradients follow ``torch.max``'s convention: the first maximal neighbour of a channel
receives all of its gradient.

``u`` and ``v`` may be given as a ``Bag``: each row a weighted sum of a few rows of a table (the sampler's bilinear
reads of projected patches). The C++ kernel then builds one region's rows at a time in a cache-sized buffer and sends
their gradient to the table rows, so neither the [R, P, C] rows nor their gradient is ever materialised.

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
from typing import NamedTuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["Bag", "kernel_available", "pair_pool"]

# Pair activations ([regions, S, k, C] elements) the PyTorch fallback materialises at once.
_FALLBACK_CHUNK_ELEMENTS = {"cpu": 1 << 24, "other": 1 << 28}

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

inline float relu(float x) { return x > 0.f ? x : 0.f; }

// Accumulators of the backward pass: per-point and per-anchor gradients (grad_t) and table gradients (table_t).
// A point's gradient is netted in its accumulator as it arrives (+dh as a neighbour, -dh as an anchor), which keeps
// it accurate in float (and double here would halve the vector width of the hottest loop). A table row sums the
// netted gradients of many points of several regions, in double (measured: no cost).
typedef float grad_t;
typedef double table_t;

// One [R, n, C] operand: dense rows, or each row a weighted sum of m rows of a table (a bilinear read).
struct Source {
  const float* dense;    // [R, n, C], or null
  const float* table;    // [T, C]
  const int64_t* index;  // [R, n, m] into the table
  const float* weight;   // [R, n, m]
  int64_t n, m, T;
};

struct Dims { int64_t R, P, S, K, C; };

// Region r's rows of a source: a pointer into the dense tensor, or the weighted sums written into buf [n, C].
const float* region_rows(const Source& s, int64_t r, int64_t C, float* __restrict buf) {
  if (s.dense) return s.dense + r * s.n * C;
  for (int64_t i = 0; i < s.n; ++i) {
    float* __restrict o = buf + i * C;
    std::memset(o, 0, sizeof(float) * C);
    for (int64_t t = 0; t < s.m; ++t) {
      const float wt = s.weight[(r * s.n + i) * s.m + t];
      if (wt == 0.f) continue;
      const float* __restrict row = s.table + s.index[(r * s.n + i) * s.m + t] * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += wt * row[c];
    }
  }
  return buf;
}

// Adds region r's row gradients g [n, C] to the source's gradient: the dense rows, or the table rows they read.
// Table gradients are accumulated in double: a table row receives the gradients of many points and anchors, with
// both signs when u and v read the same table, and their sum is much smaller than its terms.
void scatter_rows(const Source& s, int64_t r, int64_t C, const grad_t* __restrict g, float* grad_dense,
                  table_t* grad_table) {
  if (s.dense) {
    float* __restrict out = grad_dense + r * s.n * C;
    for (int64_t i = 0; i < s.n * C; ++i) out[i] = static_cast<float>(g[i]);
    return;
  }
  for (int64_t i = 0; i < s.n; ++i) {
    const grad_t* __restrict gi = g + i * C;
    for (int64_t t = 0; t < s.m; ++t) {
      const float wt = s.weight[(r * s.n + i) * s.m + t];
      if (wt == 0.f) continue;
      table_t* __restrict row = grad_table + s.index[(r * s.n + i) * s.m + t] * C;
      const table_t wd = wt;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c] += wd * gi[c];
    }
  }
}

// With anchor indices, the anchor term is v[s] - u[anchor[s]] (written into buf [S, C]); otherwise v itself.
const float* anchor_rows(const float* v, const float* u, const int64_t* anchor, int64_t r, int64_t S, int64_t C,
                         float* __restrict buf) {
  if (!anchor) return v;
  for (int64_t s = 0; s < S; ++s) {
    const float* __restrict vs = v + s * C;
    const float* __restrict us = u + anchor[r * S + s] * C;
    float* __restrict o = buf + s * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = vs[c] - us[c];
  }
  return buf;
}

// h = u + v; mean and 1/sqrt(var + eps) of relu(h) over the C channels (LayerNorm's biased variance).
inline void pair_stats(const float* __restrict u, const float* __restrict v, float* __restrict h, int64_t C, float eps,
                       float* mean, float* rstd) {
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

void forward_regions(const Source& us, const Source& vs, const int64_t* anchor, const int64_t* nb,
                     const float* __restrict w,
                     const float* __restrict b, float eps, bool max_mode, Dims d, int64_t r0, int64_t r1, float* out,
                     uint8_t* arg) {
  std::vector<float> ubuf(us.dense ? 0 : d.P * d.C), vbuf(vs.dense ? 0 : d.S * d.C), abuf(anchor ? d.S * d.C : 0);
  std::vector<float> hbuf(d.C), best_buf(d.C), which_buf(d.C);
  float* __restrict h = hbuf.data();
  float* __restrict best = best_buf.data();
  float* __restrict which = which_buf.data();  // the winning neighbour, as a float so the loop vectorises
  for (int64_t r = r0; r < r1; ++r) {
    const float* u = region_rows(us, r, d.C, ubuf.data());
    const float* v = anchor_rows(region_rows(vs, r, d.C, vbuf.data()), u, anchor, r, d.S, d.C, abuf.data());
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t row = r * d.S + s;
      const float init = max_mode ? -INFINITY : 0.f;
      for (int64_t c = 0; c < d.C; ++c) {
        best[c] = init;
        which[c] = 0.f;
      }
      for (int64_t j = 0; j < d.K; ++j) {
        float mean, rstd;
        pair_stats(u + nb[row * d.K + j] * d.C, v + s * d.C, h, d.C, eps, &mean, &rstd);
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

struct Grads {
  float* u_dense;
  table_t* u_table;  // this thread's partial table gradient
  float* v_dense;
  table_t* v_table;
  double* w;  // this thread's partials, [C]: sums over thousands of pairs, so in double
  double* b;
};

void backward_regions(const Source& us, const Source& vs, const int64_t* anchor, const int64_t* nb,
                      const float* __restrict w,
                      const float* g, const uint8_t* arg, float eps, bool max_mode, Dims d, int64_t r0, int64_t r1,
                      bool need_u, bool need_v, Grads out) {
  std::vector<float> ubuf(us.dense ? 0 : d.P * d.C), vbuf(vs.dense ? 0 : d.S * d.C);
  std::vector<float> abuf(anchor ? d.S * d.C : 0), hbuf(d.C), xbuf(d.C), dbuf(d.C), awbuf(d.C), abbuf(d.C);
  // Per-point and per-anchor gradients: with anchor indices a point collects +dh as a neighbour and -dh as an
  // anchor, and the small difference is what matters.
  std::vector<grad_t> gu_buf(d.P * d.C), gv_buf(d.S * d.C);
  float* __restrict h = hbuf.data();
  float* __restrict xh = xbuf.data();
  float* __restrict dx = dbuf.data();
  double* __restrict gw = out.w;
  double* __restrict gb = out.b;
  float* __restrict aw = awbuf.data();  // one anchor's LayerNorm-parameter gradients, added to gw / gb after it
  float* __restrict ab = abbuf.data();
  const float inv_k = 1.f / static_cast<float>(d.K);
  const float inv_c = 1.f / static_cast<float>(d.C);
  for (int64_t r = r0; r < r1; ++r) {
    const float* u = region_rows(us, r, d.C, ubuf.data());
    const float* v = anchor_rows(region_rows(vs, r, d.C, vbuf.data()), u, anchor, r, d.S, d.C, abuf.data());
    std::fill(gu_buf.begin(), gu_buf.end(), 0.0);
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t row = r * d.S + s;
      const float* __restrict gr = g + row * d.C;
      const uint8_t* __restrict a = max_mode ? arg + row * d.C : nullptr;
      grad_t* __restrict gv = gv_buf.data() + s * d.C;
      std::fill(gv, gv + d.C, 0.0);
      std::fill(aw, aw + d.C, 0.f);
      std::fill(ab, ab + d.C, 0.f);
      for (int64_t j = 0; j < d.K; ++j) {
        const int64_t idx = nb[row * d.K + j];
        float mean, rstd;
        pair_stats(u + idx * d.C, v + s * d.C, h, d.C, eps, &mean, &rstd);
        float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t c = 0; c < d.C; ++c) {
          const float x = (relu(h[c]) - mean) * rstd;
          const float dy = max_mode ? (a[c] == j ? gr[c] : 0.f) : gr[c] * inv_k;
          aw[c] += dy * x;
          ab[c] += dy;
          xh[c] = x;
          dx[c] = dy * w[c];
          s1 += dx[c];
          s2 += dx[c] * x;
        }
        const float m1 = s1 * inv_c, m2 = s2 * inv_c;
        grad_t* __restrict gu = gu_buf.data() + idx * d.C;
#pragma omp simd
        for (int64_t c = 0; c < d.C; ++c) {
          const float dh = h[c] > 0.f ? rstd * (dx[c] - m1 - xh[c] * m2) : 0.f;
          gu[c] += dh;
          gv[c] += dh;
        }
      }
      for (int64_t c = 0; c < d.C; ++c) {
        gw[c] += aw[c];
        gb[c] += ab[c];
      }
      if (anchor) {
        grad_t* __restrict ga = gu_buf.data() + anchor[row] * d.C;
#pragma omp simd
        for (int64_t c = 0; c < d.C; ++c) ga[c] -= gv[c];
      }
    }
    if (need_u) scatter_rows(us, r, d.C, gu_buf.data(), out.u_dense, out.u_table);
    if (need_v) scatter_rows(vs, r, d.C, gv_buf.data(), out.v_dense, out.v_table);
  }
}

template <typename Fn>
void split_regions(int64_t n, int64_t R, Fn fn) {
  if (n == 1) {
    fn(0, 0, R);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < n; ++t) pool.emplace_back([=] { fn(t, R * t / n, R * (t + 1) / n); });
  for (auto& th : pool) th.join();
}

int64_t thread_count(int threads, int64_t R) { return std::max<int64_t>(1, std::min<int64_t>(threads, R)); }

Source make_source(const float* dense, const float* table, const int64_t* index, const float* weight, int64_t n,
                   int64_t m, int64_t T) {
  return Source{dense, table, index, weight, n, m, T};
}

}  // namespace

extern "C" {

// u: dense [R, P, C] (u_dense) or a bag (u_table [Tu, C], u_index / u_weight [R, P, mu]); v likewise with S rows.
// anchor [R, S] (or null): the anchor term is v[s] - u[anchor[s]].
int ferret_pair_pool_forward(const float* u_dense, const float* u_table, const int64_t* u_index,
                             const float* u_weight, int64_t mu, int64_t Tu, const float* v_dense,
                             const float* v_table, const int64_t* v_index, const float* v_weight, int64_t mv,
                             int64_t Tv, const int64_t* anchor, const int64_t* nb, const float* w, const float* b,
                             float eps, int max_mode,
                             int64_t R, int64_t P, int64_t S, int64_t K, int64_t C, int threads, float* out,
                             uint8_t* arg) {
  const Dims d{R, P, S, K, C};
  const Source us = make_source(u_dense, u_table, u_index, u_weight, P, mu, Tu);
  const Source vs = make_source(v_dense, v_table, v_index, v_weight, S, mv, Tv);
  split_regions(thread_count(threads, R), R, [&](int64_t, int64_t r0, int64_t r1) {
    forward_regions(us, vs, anchor, nb, w, b, eps, max_mode != 0, d, r0, r1, out, arg);
  });
  return 0;
}

// Gradients: gu_dense [R, P, C] or gu_table [Tu, C], likewise for v (all overwritten); null when not needed.
// gw, gb [C] are overwritten.
int ferret_pair_pool_backward(const float* u_dense, const float* u_table, const int64_t* u_index,
                              const float* u_weight, int64_t mu, int64_t Tu, const float* v_dense,
                              const float* v_table, const int64_t* v_index, const float* v_weight, int64_t mv,
                              int64_t Tv, const int64_t* anchor, const int64_t* nb, const float* w, const float* g,
                              const uint8_t* arg,
                              float eps, int max_mode, int64_t R, int64_t P, int64_t S, int64_t K, int64_t C,
                              int threads, float* gu_dense, float* gu_table, float* gv_dense, float* gv_table,
                              float* gw, float* gb) {
  const Dims d{R, P, S, K, C};
  const Source us = make_source(u_dense, u_table, u_index, u_weight, P, mu, Tu);
  const Source vs = make_source(v_dense, v_table, v_index, v_weight, S, mv, Tv);
  // u and v reading one table (gv_table null): both gradients go to gu_table, summed in one accumulator.
  const bool shared = u_table != nullptr && u_table == v_table;
  const bool need_u = gu_dense || gu_table, need_v = gv_dense || gv_table || (shared && gu_table);
  const int64_t n = thread_count(threads, R);
  std::vector<double> part_w(n * C, 0.0), part_b(n * C, 0.0);
  std::vector<table_t> part_u(gu_table ? n * Tu * C : 0, 0.0), part_v(gv_table && !shared ? n * Tv * C : 0, 0.0);
  split_regions(n, R, [&](int64_t t, int64_t r0, int64_t r1) {
    Grads out{gu_dense, nullptr, gv_dense, nullptr, part_w.data() + t * C, part_b.data() + t * C};
    if (gu_table) out.u_table = part_u.data() + t * Tu * C;
    if (shared) out.v_table = out.u_table;
    else if (gv_table) out.v_table = part_v.data() + t * Tv * C;
    backward_regions(us, vs, anchor, nb, w, g, arg, eps, max_mode != 0, d, r0, r1, need_u, need_v, out);
  });
  auto reduce = [n](const std::vector<table_t>& parts, int64_t size, float* target) {
    for (int64_t i = 0; i < size; ++i) {
      table_t sum = 0.0;
      for (int64_t t = 0; t < n; ++t) sum += parts[t * size + i];
      target[i] = static_cast<float>(sum);
    }
  };
  if (gu_table) reduce(part_u, Tu * C, gu_table);
  if (gv_table && !shared) reduce(part_v, Tv * C, gv_table);
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      sw += part_w[t * C + c];
      sb += part_b[t * C + c];
    }
    gw[c] = static_cast<float>(sw);
    gb[c] = static_cast<float>(sb);
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
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    source = [pointer, pointer, pointer, pointer, i64, i64]
    library.ferret_pair_pool_forward.argtypes = source * 2 + [pointer] * 4 + [f32, i32] + [i64] * 5 + [
        i32, pointer, pointer]
    library.ferret_pair_pool_backward.argtypes = source * 2 + [pointer] * 5 + [f32, i32] + [i64] * 5 + [
        i32] + [pointer] * 6
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


def _anchor_terms(u_flat, v, anchor, part, num_points):
    """v[part], minus u at the chunk's anchors when anchor indices are given: [r, S, C]."""
    if anchor is None:
        return v[part]
    rows = anchor[part] + torch.arange(anchor.shape[0], device=anchor.device)[part, None] * num_points
    return v[part] - u_flat.index_select(0, rows.reshape(-1)).view_as(v[part])


def _torch_forward(u, v, anchor, nb, weight, bias, eps, max_mode):
    num_regions, num_points, channels = u.shape
    _, num_anchors, k = nb.shape
    u_flat = u.reshape(-1, channels)
    flat_nb = (nb + torch.arange(num_regions, device=nb.device)[:, None, None] * num_points).reshape(num_regions, -1)
    out = u.new_empty(num_regions, num_anchors, channels)
    arg = torch.empty(num_regions, num_anchors, channels, dtype=torch.uint8, device=u.device) if max_mode else None
    step = _chunk_regions(u, num_anchors, k)
    for start in range(0, num_regions, step):
        part = slice(start, start + step)
        hidden = _pairs(u_flat, _anchor_terms(u_flat, v, anchor, part, num_points), flat_nb[part].reshape(-1)).relu_()
        hidden = F.layer_norm(hidden, (channels,), weight, bias, eps)
        if max_mode:
            best = hidden.max(dim=2)  # first maximal index on ties
            out[part], arg[part] = best.values, best.indices.to(torch.uint8)
        else:
            out[part] = hidden.mean(dim=2)
    return out, arg


def _torch_backward(u, v, anchor, nb, weight, grad_out, arg, eps, max_mode, need_u, need_v):
    num_regions, num_points, channels = u.shape
    _, num_anchors, k = nb.shape
    u_flat = u.reshape(-1, channels)
    flat_nb = (nb + torch.arange(num_regions, device=nb.device)[:, None, None] * num_points).reshape(num_regions, -1)
    grad_u = torch.empty_like(u_flat) if need_u else None
    grad_v = torch.empty_like(v) if need_v else None
    grad_w = torch.zeros(channels, dtype=torch.float32, device=u.device)
    grad_b = grad_out.sum(dim=(0, 1))
    step = _chunk_regions(u, num_anchors, k)
    for start in range(0, num_regions, step):
        part = slice(start, start + step)
        index = flat_nb[part].reshape(-1)
        hidden = _pairs(u_flat, _anchor_terms(u_flat, v, anchor, part, num_points), index)
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
        grad_anchor = dh.sum(dim=2)
        if need_v:
            grad_v[part] = grad_anchor
        if need_u:
            # This chunk's points, netted in double: +dh as a neighbour, -dh as an anchor (see the C++ kernel).
            first = start * num_points
            local = torch.zeros(grad_anchor.shape[0] * num_points, channels, dtype=torch.float64, device=u.device)
            local.index_add_(0, index - first, dh.reshape(-1, channels).double())
            if anchor is not None:
                rows = anchor[part] + torch.arange(grad_anchor.shape[0], device=u.device)[:, None] * num_points
                local.index_add_(0, rows.reshape(-1), -grad_anchor.reshape(-1, channels).double())
            grad_u[first : first + local.shape[0]] = local
    return (grad_u.view_as(u) if need_u else None), grad_v, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


class Bag(NamedTuple):
    """Rows given as weighted sums of table rows: row (r, i) = sum_t weight[r, i, t] * table[index[r, i, t]].

    table [T, C]; index [R, n, m] long; weight [R, n, m] float32 (not differentiated).
    """

    table: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    def materialise(self) -> torch.Tensor:
        """-> [R, n, C], differentiable in the table."""
        num_regions, rows, terms = self.index.shape
        # In double: a table row's gradient sums many points' gradients of both signs (see the C++ kernel).
        out = F.embedding_bag(self.index.reshape(-1, terms), self.table.double(),
                              per_sample_weights=self.weight.reshape(-1, terms).double(), mode="sum")
        return out.float().view(num_regions, rows, -1)


class _TorchPairPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, v, anchor, nb, weight, bias, eps, max_mode):
        out, arg = _torch_forward(u, v, anchor, nb, weight, bias, eps, max_mode)
        ctx.save_for_backward(u, v, anchor, nb, weight, arg)
        ctx.eps, ctx.max_mode = eps, max_mode
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, v, anchor, nb, weight, arg = ctx.saved_tensors
        grad_u, grad_v, grad_w, grad_b = _torch_backward(
            u, v, anchor, nb, weight, grad_out.float().contiguous(), arg, ctx.eps, ctx.max_mode,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_u, grad_v, None, None, grad_w, grad_b, None, None


def _source_args(data: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor | None) -> list:
    """The six C arguments of one operand: (dense, table, index, weight, terms, table rows)."""
    if index is None:
        return [_ptr(data), None, None, None, 0, 0]
    return [None, _ptr(data), _ptr(index), _ptr(weight), index.shape[2], data.shape[0]]


class _KernelPairPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, u_index, u_weight, v, v_index, v_weight, anchor, nb, weight, bias, eps, max_mode, library):
        num_regions, num_anchors, k = nb.shape
        num_points = u.shape[1] if u_index is None else u_index.shape[1]
        channels = weight.shape[0]
        out = torch.empty(num_regions, num_anchors, channels)
        arg = torch.empty(out.shape, dtype=torch.uint8) if max_mode else None
        library.ferret_pair_pool_forward(
            *_source_args(u, u_index, u_weight), *_source_args(v, v_index, v_weight), _ptr(anchor), _ptr(nb),
            _ptr(weight), _ptr(bias), eps, int(max_mode), num_regions, num_points, num_anchors, k, channels,
            torch.get_num_threads(), _ptr(out), _ptr(arg))
        ctx.save_for_backward(u, u_index, u_weight, v, v_index, v_weight, anchor, nb, weight, arg)
        ctx.eps, ctx.max_mode, ctx.library, ctx.num_points = eps, max_mode, library, num_points
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, u_index, u_weight, v, v_index, v_weight, anchor, nb, weight, arg = ctx.saved_tensors
        num_regions, num_anchors, k = nb.shape
        channels = weight.shape[0]
        need_u, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        shared = u_index is not None and u is v  # one table read by both: one gradient, returned once
        grad_u = torch.empty_like(u) if need_u or (shared and need_v) else None
        grad_v = torch.empty_like(v) if need_v and not shared else None
        grad_w, grad_b = torch.empty(channels), torch.empty(channels)
        dense_u, table_u = (grad_u, None) if u_index is None else (None, grad_u)
        dense_v, table_v = (grad_v, None) if v_index is None else (None, grad_v)
        grad_out = grad_out.float().contiguous()  # bound to a name: the kernel reads it after _ptr returns
        ctx.library.ferret_pair_pool_backward(
            *_source_args(u, u_index, u_weight), *_source_args(v, v_index, v_weight), _ptr(anchor), _ptr(nb),
            _ptr(weight), _ptr(grad_out), _ptr(arg), ctx.eps, int(ctx.max_mode), num_regions,
            ctx.num_points, num_anchors, k, channels, torch.get_num_threads(), _ptr(dense_u), _ptr(table_u),
            _ptr(dense_v), _ptr(table_v), _ptr(grad_w), _ptr(grad_b))
        return grad_u, None, None, grad_v, None, None, None, None, grad_w, grad_b, None, None, None


def _operand(x: torch.Tensor | Bag) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(x, Bag):
        return x.table.float().contiguous(), x.index.long().contiguous(), x.weight.float().contiguous()
    return x.float().contiguous(), None, None


def pair_pool(
    u: torch.Tensor | Bag,
    v: torch.Tensor | Bag,
    neighbor_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    mode: str = "max",
    use_kernel: bool = True,
    anchor_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled LayerNorm(ReLU(u[neighbour] + v[anchor])) of every anchor, computed in fp32.

    Args:
        u: [R, P, C] per-point terms, or a ``Bag`` of P rows per region (read inside the kernel, so the [R, P, C]
            tensor and its gradient are never materialised).
        v: [R, S, C] per-anchor terms, or a ``Bag`` of S rows per region. When both are bags of the same table
            tensor, its gradient is accumulated once, in double precision, so terms of opposite sign cancel exactly.
        neighbor_index: [R, S, k] long, indices into P; k <= 255.
        weight, bias: [C] LayerNorm affine parameters; eps its epsilon.
        mode: "max" or "mean" over the k neighbours.
        use_kernel: allow the C++ kernel for CPU tensors (False forces the PyTorch path).
        anchor_index: [R, S] long indices into P, or None. Given, the anchor term is ``v[s] - u[anchor_index[s]]``:
            the kernel then nets each point's gradient as a neighbour against its gradient as an anchor before it
            leaves the kernel, instead of leaving two large opposite sums to the caller.

    Returns:
        [R, S, C] float32. Differentiable in u (or its table), v (or its table), weight and bias.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
    if neighbor_index.dim() != 3 or not 0 < neighbor_index.shape[2] <= 255:
        raise ValueError(f"neighbor_index must be [R, S, k] with 1 <= k <= 255, got {tuple(neighbor_index.shape)}")
    num_regions, num_anchors, _ = neighbor_index.shape
    u_rows = u.index.shape if isinstance(u, Bag) else u.shape
    v_rows = v.index.shape if isinstance(v, Bag) else v.shape
    if len(u_rows) != 3 or len(v_rows) != 3 or u_rows[0] != num_regions or tuple(v_rows[:2]) != (
            num_regions, num_anchors):
        raise ValueError(
            f"u must have [R, P, .] and v [R, S, .] rows for neighbor_index [R, S, k] = "
            f"{tuple(neighbor_index.shape)}, got {tuple(u_rows)} and {tuple(v_rows)}"
        )
    device = neighbor_index.device
    library = _kernel() if use_kernel and device.type == "cpu" else None
    nb = neighbor_index.long().contiguous()
    w, b = weight.float().contiguous(), bias.float().contiguous()
    anchor = None if anchor_index is None else anchor_index.long().contiguous()
    if anchor is not None and tuple(anchor.shape) != (num_regions, num_anchors):
        raise ValueError(f"anchor_index must be [R, S] = {(num_regions, num_anchors)}, got {tuple(anchor.shape)}")
    if library is None:
        dense_u = u.materialise() if isinstance(u, Bag) else u
        dense_v = v.materialise() if isinstance(v, Bag) else v
        return _TorchPairPool.apply(dense_u.float().contiguous(), dense_v.float().contiguous(), anchor, nb, w, b,
                                    float(eps), mode == "max")
    return _KernelPairPool.apply(*_operand(u), *_operand(v), anchor, nb, w, b, float(eps), mode == "max", library)

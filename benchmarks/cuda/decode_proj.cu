// Probe kernel (benchmarks/probe_cuda_gemv.py): one decode projection for one row, as one kernel.
//
//   out = act(LayerNorm(x) . W^T + bias) + residual          x [K], W [N, K] (row-major), bf16
//
// with the model's roundings (XLA path): LayerNorm in float32 (two-pass statistics) rounded to bf16,
// the product accumulated in float32 and rounded, + bias rounded, relu^2 rounded, + residual rounded.
//
// Each warp owns groups of R output rows (grid-stride over groups; the caller picks a grid that
// gives every warp the same number of groups, all blocks resident at once) and walks K in steps
// of 256 (a lane: 16 bytes, 8 bf16, of each of its R rows). The weights (and x, without a
// LayerNorm; with one, the normalised row sits in shared memory) stream
// through a per-warp ring of S shared-memory stages filled by cp.async, S-1 steps ahead, across
// group boundaries; each lane reads back only the 16 bytes it copied, so a lane waits on its own
// copies (cp.async.wait_group) and the warp never synchronises. The ring is filled before the
// LayerNorm prologue, so the statistics are computed while the first S-1 steps are on their way.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStep = 256;  // K per warp step: 32 lanes x 8 bf16

__device__ __forceinline__ float bf16_round(float v) {
  return __bfloat162float(__float2bfloat16(v));
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += scratch[w];
  return s;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float dot8(const uint4& wv, const float* xv) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&wv);
  const float4 xa = reinterpret_cast<const float4*>(xv)[0];
  const float4 xb = reinterpret_cast<const float4*>(xv)[1];
  const float2 w0 = __bfloat1622float2(p[0]), w1 = __bfloat1622float2(p[1]);
  const float2 w2 = __bfloat1622float2(p[2]), w3 = __bfloat1622float2(p[3]);
  return w0.x * xa.x + w0.y * xa.y + w1.x * xa.z + w1.y * xa.w + w2.x * xb.x + w2.y * xb.y +
         w3.x * xb.z + w3.y * xb.w;
}

template <int R, int S, bool NORM, bool RELU2, bool RESID>
__global__ void __launch_bounds__(kThreads) proj_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    const __nv_bfloat16* __restrict__ bias, const __nv_bfloat16* __restrict__ scale,
    const __nv_bfloat16* __restrict__ shift, const __nv_bfloat16* __restrict__ residual,
    __nv_bfloat16* __restrict__ out, int n, int k, float eps) {
  // dynamic shared memory: the rings [kWarps][S][E][32] uint4 (E: R weight rows, and without
  // NORM x's chunk as well), then with NORM the normalised x [k] float32
  constexpr int E = NORM ? R : R + 1;
  extern __shared__ uint4 smem[];
  __shared__ float scratch[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint4* ring = smem + warp * S * E * 32;
  float* xs = reinterpret_cast<float*>(smem + kWarps * S * E * 32);

  const int steps = k / kStep;
  const int groups = (n + R - 1) / R;
  const int g0 = blockIdx.x * kWarps + warp, gstride = gridDim.x * kWarps;
  const int mine = g0 < groups ? (groups - 1 - g0) / gstride + 1 : 0;
  const int total = mine * steps;
  const int64_t row_vecs = k / 8;
  const uint4* wbase = reinterpret_cast<const uint4*>(w) + lane;
  auto issue = [&](int t) {  // step t's copies into its ring slot (an empty group past the end)
    if (t < total) {
      const int gi = t / steps, s = t - gi * steps;
      const int base = (g0 + gi * gstride) * R;
      uint4* slot = ring + (t % S) * E * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = min(base + r, n - 1);  // past n: read, never written
        cp_async16(slot + r * 32, wbase + row * row_vecs + s * 32);
      }
      if (!NORM) cp_async16(slot + R * 32, reinterpret_cast<const uint4*>(x) + lane + s * 32);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int t = 0; t < S - 1; ++t) issue(t);

  // NORM: the normalised input row into shared memory (two-pass statistics)
  if (NORM) {
    float part = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) {
      const float v = __bfloat162float(x[i]);
      xs[i] = v;
      part += v;
    }
    const float mean = block_sum(part, scratch) / k;
    part = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) {
      const float d = xs[i] - mean;
      part += d * d;
    }
    const float rstd = rsqrtf(block_sum(part, scratch) / k + eps);
    for (int i = threadIdx.x; i < k; i += kThreads)
      xs[i] = bf16_round((xs[i] - mean) * rstd * __bfloat162float(scale[i]) +
                         __bfloat162float(shift[i]));
    __syncthreads();
  }

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int t = 0; t < total; ++t) {
    issue(t + S - 1);
    cp_async_wait<S - 1>();  // this lane's copies of step t have landed
    const int gi = t / steps, s = t - gi * steps;
    const uint4* slot = ring + (t % S) * E * 32 + lane;
    float xv[8];
    if (NORM) {
      const float4* p = reinterpret_cast<const float4*>(xs + s * kStep + lane * 8);
      *reinterpret_cast<float4*>(xv) = p[0];
      *reinterpret_cast<float4*>(xv + 4) = p[1];
    } else {
      const uint4 raw = slot[R * 32];
      const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(q[j]);
        xv[2 * j] = f.x;
        xv[2 * j + 1] = f.y;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] += dot8(slot[r * 32], xv);
    if (s == steps - 1) {  // the group's rows are done: reduce, epilogue, write
      const int row0 = (g0 + gi * gstride) * R;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[r];
        acc[r] = 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        const int row = row0 + r;
        if (lane == r && row < n) {
          float y = bf16_round(v);
          y = bf16_round(y + __bfloat162float(bias[row]));
          if (RELU2) {
            y = fmaxf(y, 0.f);
            y = bf16_round(y * y);
          }
          if (RESID) y = __bfloat162float(residual[row]) + y;
          out[row] = __float2bfloat16(y);
        }
      }
    }
  }
  cp_async_wait<0>();
}

template <int R, int S, bool NORM, bool RELU2, bool RESID>
cudaError_t launch(cudaStream_t stream, const __nv_bfloat16* x, const __nv_bfloat16* w,
                   const __nv_bfloat16* bias, const __nv_bfloat16* scale,
                   const __nv_bfloat16* shift, const __nv_bfloat16* residual,
                   __nv_bfloat16* out, int n, int k, float eps, int grid) {
  auto kernel = proj_kernel<R, S, NORM, RELU2, RESID>;
  constexpr int E = NORM ? R : R + 1;
  const size_t smem = static_cast<size_t>(kWarps) * S * E * 32 * sizeof(uint4) +
                      (NORM ? static_cast<size_t>(k) * sizeof(float) : 0);
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int rows_per_block = kWarps * R;
  if (grid <= 0) grid = (n + rows_per_block - 1) / rows_per_block;
  kernel<<<grid, kThreads, smem, stream>>>(x, w, bias, scale, shift, residual, out, n, k, eps);
  return cudaGetLastError();
}

template <int R, int S>
cudaError_t dispatch_flags(bool norm, bool relu2, bool resid, cudaStream_t s,
                           const __nv_bfloat16* x, const __nv_bfloat16* w,
                           const __nv_bfloat16* b, const __nv_bfloat16* g,
                           const __nv_bfloat16* sh, const __nv_bfloat16* res,
                           __nv_bfloat16* o, int n, int k, float eps, int grid) {
  // the combinations the decode layer uses: qkv (norm), o / down (resid), up (norm, relu2)
  if (norm && !relu2 && !resid)
    return launch<R, S, true, false, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid);
  if (norm && relu2 && !resid)
    return launch<R, S, true, true, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid);
  if (!norm && !relu2 && resid)
    return launch<R, S, false, false, true>(s, x, w, b, g, sh, res, o, n, k, eps, grid);
  if (!norm && !relu2 && !resid)
    return launch<R, S, false, false, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid);
  return cudaErrorInvalidValue;
}

ffi::Error ProjImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Buffer<ffi::BF16> bias, ffi::Buffer<ffi::BF16> scale,
                    ffi::Buffer<ffi::BF16> shift, ffi::Buffer<ffi::BF16> residual,
                    ffi::ResultBuffer<ffi::BF16> out, int64_t norm, int64_t relu2,
                    int64_t resid, int64_t rows, int64_t stages, int64_t grid, float eps) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("w must be [N, K]");
  const int n = static_cast<int>(wd[0]), k = static_cast<int>(wd[1]);
  if (k % kStep) return ffi::Error::InvalidArgument("K must be a multiple of 256");
  if (x.element_count() != static_cast<size_t>(k) || bias.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("x must be [K] and bias [N]");
  auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.untyped_data());
  auto* wp = reinterpret_cast<const __nv_bfloat16*>(w.untyped_data());
  auto* bp = reinterpret_cast<const __nv_bfloat16*>(bias.untyped_data());
  auto* gp = reinterpret_cast<const __nv_bfloat16*>(scale.untyped_data());
  auto* sp = reinterpret_cast<const __nv_bfloat16*>(shift.untyped_data());
  auto* rp = reinterpret_cast<const __nv_bfloat16*>(residual.untyped_data());
  auto* op = reinterpret_cast<__nv_bfloat16*>(out->untyped_data());
  cudaError_t e = cudaErrorInvalidValue;
#define JAIS2_CASE(RR, SS)                                                               \
  if (rows == RR && stages == SS)                                                        \
    e = dispatch_flags<RR, SS>(norm, relu2, resid, stream, xp, wp, bp, gp, sp, rp, op, n, k, \
                               eps, static_cast<int>(grid));
  JAIS2_CASE(1, 4) JAIS2_CASE(1, 8) JAIS2_CASE(1, 16) JAIS2_CASE(2, 4) JAIS2_CASE(2, 8)
  JAIS2_CASE(2, 16) JAIS2_CASE(4, 4) JAIS2_CASE(4, 8)
#undef JAIS2_CASE
  if (e != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Jais2DecodeProj, ProjImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("norm")
                                  .Attr<int64_t>("relu2")
                                  .Attr<int64_t>("resid")
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("stages")
                                  .Attr<int64_t>("grid")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

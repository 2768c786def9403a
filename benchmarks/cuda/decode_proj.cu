// Probe kernel (benchmarks/probe_cuda_gemv.py): one decode projection for one row, as one kernel.
//
//   out = act(LayerNorm(x) . W^T + bias) + residual          x [K], W [N, K] (row-major), bf16
//
// with the model's roundings (XLA path): LayerNorm in float32 (two-pass statistics) rounded to bf16,
// the product accumulated in float32 and rounded, + bias rounded, relu^2 rounded, + residual rounded.
// Each warp owns R output rows and walks K in 16-byte loads (8 bf16 a lane, 256 K a warp step),
// U steps of loads in flight; the block's 8 warps share the (normalised) x in shared memory.
// The first batch of weight loads is issued before the LayerNorm prologue, so the statistics are
// computed while the weights are on their way.

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

template <int R, int U, bool NORM, bool RELU2, bool RESID>
__global__ void __launch_bounds__(kThreads) proj_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    const __nv_bfloat16* __restrict__ bias, const __nv_bfloat16* __restrict__ scale,
    const __nv_bfloat16* __restrict__ shift, const __nv_bfloat16* __restrict__ residual,
    __nv_bfloat16* __restrict__ out, int n, int k, float eps) {
  extern __shared__ float xs[];  // [k] float32, the (normalised, rounded) input row
  __shared__ float scratch[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * kWarps + warp) * R;
  const int steps = k / kStep;

  // rows past n (the last block) read row n-1 and write nothing
  const uint4* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, n - 1);
    wrow[r] = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(row) * k) + lane;
  }
  uint4 buf[R][U];
  auto load = [&](int s0) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (s0 + u < steps) buf[r][u] = __ldg(wrow[r] + (s0 + u) * (kStep / 8));
  };
  load(0);

  // the input row into shared memory, normalised when NORM
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
  } else {
    for (int i = threadIdx.x; i < k; i += kThreads) xs[i] = __bfloat162float(x[i]);
  }
  __syncthreads();

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int s0 = 0; s0 < steps; s0 += U) {
    uint4 cur[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) cur[r][u] = buf[r][u];
    if (s0 + U < steps) load(s0 + U);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u < steps) {
        const float4* xv = reinterpret_cast<const float4*>(xs + (s0 + u) * kStep + lane * 8);
        const float4 xa = xv[0], xb = xv[1];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&cur[r][u]);
          const float2 w0 = __bfloat1622float2(p[0]), w1 = __bfloat1622float2(p[1]);
          const float2 w2 = __bfloat1622float2(p[2]), w3 = __bfloat1622float2(p[3]);
          acc[r] += w0.x * xa.x + w0.y * xa.y + w1.x * xa.z + w1.y * xa.w +
                    w2.x * xb.x + w2.y * xb.y + w3.x * xb.z + w3.y * xb.w;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
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

template <int R, int U, bool NORM, bool RELU2, bool RESID>
cudaError_t launch(cudaStream_t stream, const __nv_bfloat16* x, const __nv_bfloat16* w,
                   const __nv_bfloat16* bias, const __nv_bfloat16* scale,
                   const __nv_bfloat16* shift, const __nv_bfloat16* residual,
                   __nv_bfloat16* out, int n, int k, float eps) {
  auto kernel = proj_kernel<R, U, NORM, RELU2, RESID>;
  const size_t smem = static_cast<size_t>(k) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int rows_per_block = kWarps * R;
  kernel<<<(n + rows_per_block - 1) / rows_per_block, kThreads, smem, stream>>>(
      x, w, bias, scale, shift, residual, out, n, k, eps);
  return cudaGetLastError();
}

template <int R, int U>
cudaError_t dispatch_flags(bool norm, bool relu2, bool resid, cudaStream_t s,
                           const __nv_bfloat16* x, const __nv_bfloat16* w,
                           const __nv_bfloat16* b, const __nv_bfloat16* g,
                           const __nv_bfloat16* sh, const __nv_bfloat16* res,
                           __nv_bfloat16* o, int n, int k, float eps) {
  // the combinations the decode layer uses: qkv (norm), o / down (resid), up (norm, relu2)
  if (norm && !relu2 && !resid) return launch<R, U, true, false, false>(s, x, w, b, g, sh, res, o, n, k, eps);
  if (norm && relu2 && !resid) return launch<R, U, true, true, false>(s, x, w, b, g, sh, res, o, n, k, eps);
  if (!norm && !relu2 && resid) return launch<R, U, false, false, true>(s, x, w, b, g, sh, res, o, n, k, eps);
  if (!norm && !relu2 && !resid) return launch<R, U, false, false, false>(s, x, w, b, g, sh, res, o, n, k, eps);
  return cudaErrorInvalidValue;
}

ffi::Error ProjImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Buffer<ffi::BF16> bias, ffi::Buffer<ffi::BF16> scale,
                    ffi::Buffer<ffi::BF16> shift, ffi::Buffer<ffi::BF16> residual,
                    ffi::ResultBuffer<ffi::BF16> out, int64_t norm, int64_t relu2,
                    int64_t resid, int64_t rows, int64_t unroll, float eps) {
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
#define JAIS2_CASE(RR, UU)                                                                \
  if (rows == RR && unroll == UU)                                                         \
    e = dispatch_flags<RR, UU>(norm, relu2, resid, stream, xp, wp, bp, gp, sp, rp, op, n, k, eps);
  JAIS2_CASE(1, 4) JAIS2_CASE(1, 8) JAIS2_CASE(2, 2) JAIS2_CASE(2, 4) JAIS2_CASE(2, 8)
  JAIS2_CASE(4, 2) JAIS2_CASE(4, 4) JAIS2_CASE(1, 13) JAIS2_CASE(2, 13)
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
                                  .Attr<int64_t>("unroll")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

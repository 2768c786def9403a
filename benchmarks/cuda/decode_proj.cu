// Probe kernel (benchmarks/probe_cuda_gemv.py): one decode projection for one row, as one kernel.
//
//   out = act(LayerNorm(x) . W^T + bias) + residual                     x [K], bf16
//
// with the model's roundings (XLA path): LayerNorm in float32 (two-pass statistics) rounded to bf16,
// the product accumulated in float32 and rounded, + bias rounded, relu^2 rounded, + residual rounded.
//
// The weight comes in a blocked layout, Wb [N / G, K / 256, G, 256] (Wb[g, s, i, j] = W[s*256 + j,
// g*G + i] for the model's W [K, N]) or step-major [K / 256, N / G, G, 256] (then at each step the
// blocks together read one contiguous stretch), so that one pipeline stage, G rows x 256 K, is one
// contiguous 512 G bytes: a single bulk copy (Hopper's copy engine, cp.async.bulk) completing on an mbarrier.
// A block (8 warps, R = G / 8 rows each) owns row groups g = blockIdx.x, + gridDim.x, ... (the caller
// picks a grid that gives every block the same number of groups) and streams its groups' stages
// through an S-deep ring, S stages ahead, across group boundaries; thread 0 issues the copies. x
// sits in shared memory: with a LayerNorm, normalised by the block (float32), computed while the
// first S stages are on their way; without one, brought by its own bulk copy (bf16).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStep = 256;  // K per warp step: 32 lanes x 8 bf16
constexpr int kMaxJ = 16;  // LayerNorm prologue: K <= kMaxJ * kThreads

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

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
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
    __nv_bfloat16* __restrict__ out, int n, int k, float eps, bool step_major) {
  constexpr int G = kWarps * R;
  constexpr int STAGE = G * kStep;  // bf16 elements a stage
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem);  // [S][G][256]
  float* xs = reinterpret_cast<float*>(smem + S * STAGE * 2);   // NORM: [k] float32
  __nv_bfloat16* xb = reinterpret_cast<__nv_bfloat16*>(smem + S * STAGE * 2);  // else [k] bf16
  __shared__ __align__(8) uint64_t full[S];
  __shared__ __align__(8) uint64_t xbar;
  __shared__ float scratch[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int steps = k / kStep;
  const int groups = n / G;
  const int mine = blockIdx.x < groups ? (groups - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int total = mine * steps;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < S; ++i) mbar_init(&full[i], 1);
    mbar_init(&xbar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int t) {  // thread 0: stage t into its ring slot
    const int gi = t / steps, s = t - gi * steps;
    const int64_t grp = blockIdx.x + static_cast<int64_t>(gi) * gridDim.x;
    const int64_t chunk = step_major ? s * static_cast<int64_t>(groups) + grp : grp * steps + s;
    mbar_expect_tx(&full[t % S], STAGE * 2);
    bulk_copy(ring + (t % S) * STAGE, w + chunk * STAGE, STAGE * 2, &full[t % S]);
  };
  if (threadIdx.x == 0) {
    if (!NORM) {
      mbar_expect_tx(&xbar, k * 2);
      bulk_copy(xb, x, k * 2, &xbar);
    }
    for (int t = 0; t < S && t < total; ++t) issue(t);
  }

  if (NORM) {  // the normalised row (two-pass statistics) while the stages are on their way
    // every load issued up front (K <= kMaxJ * kThreads), so the prologue waits on memory once
    float v[kMaxJ], gs[kMaxJ], bs[kMaxJ];
#pragma unroll
    for (int j = 0; j < kMaxJ; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const bool in = i < k;
      v[j] = in ? __bfloat162float(x[i]) : 0.f;
      gs[j] = in ? __bfloat162float(scale[i]) : 0.f;
      bs[j] = in ? __bfloat162float(shift[i]) : 0.f;
    }
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxJ; ++j) part += v[j];
    const float mean = block_sum(part, scratch) / k;
    part = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxJ; ++j) {
      const float d = threadIdx.x + j * kThreads < k ? v[j] - mean : 0.f;
      part += d * d;
    }
    const float rstd = rsqrtf(block_sum(part, scratch) / k + eps);
#pragma unroll
    for (int j = 0; j < kMaxJ; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < k) xs[i] = bf16_round((v[j] - mean) * rstd * gs[j] + bs[j]);
    }
    __syncthreads();
  } else {
    mbar_wait(&xbar, 0);
  }

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  float bias_v = 0.f, res_v = 0.f;  // lane r < R: row r's bias and residual
  for (int t = 0; t < total; ++t) {
    const int slot = t % S;
    mbar_wait(&full[slot], (t / S) & 1);
    const int gi = t / steps, s = t - gi * steps;
    float xv[8];
    if (NORM) {
      const float4* p = reinterpret_cast<const float4*>(xs + s * kStep + lane * 8);
      *reinterpret_cast<float4*>(xv) = p[0];
      *reinterpret_cast<float4*>(xv + 4) = p[1];
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(xb + s * kStep + lane * 8);
      const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(q[j]);
        xv[2 * j] = f.x;
        xv[2 * j + 1] = f.y;
      }
    }
    if (s == 0 && lane < R) {  // the epilogue's operands, loaded while the group streams
      const int row = (blockIdx.x + gi * gridDim.x) * G + warp * R + lane;
      bias_v = __bfloat162float(bias[row]);
      if (RESID) res_v = __bfloat162float(residual[row]);
    }
    const __nv_bfloat16* st = ring + slot * STAGE + warp * R * kStep + lane * 8;
#pragma unroll
    for (int r = 0; r < R; ++r)
      acc[r] += dot8(*reinterpret_cast<const uint4*>(st + r * kStep), xv);
    if (s == steps - 1) {  // the group's rows are done: reduce, epilogue, write
      const int row0 = (blockIdx.x + gi * gridDim.x) * G + warp * R;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[r];
        acc[r] = 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        const int row = row0 + r;
        if (lane == r) {
          float y = bf16_round(v);
          y = bf16_round(y + bias_v);
          if (RELU2) {
            y = fmaxf(y, 0.f);
            y = bf16_round(y * y);
          }
          if (RESID) y = res_v + y;
          out[row] = __float2bfloat16(y);
        }
      }
    }
    __syncthreads();  // every warp is done with this slot
    if (threadIdx.x == 0 && t + S < total) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      issue(t + S);
    }
  }
}

template <int R, int S, bool NORM, bool RELU2, bool RESID>
cudaError_t launch(cudaStream_t stream, const __nv_bfloat16* x, const __nv_bfloat16* w,
                   const __nv_bfloat16* bias, const __nv_bfloat16* scale,
                   const __nv_bfloat16* shift, const __nv_bfloat16* residual,
                   __nv_bfloat16* out, int n, int k, float eps, int grid, bool step_major) {
  auto kernel = proj_kernel<R, S, NORM, RELU2, RESID>;
  const size_t smem = static_cast<size_t>(S) * kWarps * R * kStep * 2 +
                      static_cast<size_t>(k) * (NORM ? 4 : 2);
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  if (grid <= 0) grid = n / (kWarps * R);
  kernel<<<grid, kThreads, smem, stream>>>(x, w, bias, scale, shift, residual, out, n, k, eps, step_major);
  return cudaGetLastError();
}

template <int R, int S>
cudaError_t dispatch_flags(bool norm, bool relu2, bool resid, cudaStream_t s,
                           const __nv_bfloat16* x, const __nv_bfloat16* w,
                           const __nv_bfloat16* b, const __nv_bfloat16* g,
                           const __nv_bfloat16* sh, const __nv_bfloat16* res,
                           __nv_bfloat16* o, int n, int k, float eps, int grid, bool sm) {
  // the combinations the decode layer uses: qkv (norm), o / down (resid), up (norm, relu2)
  if (norm && !relu2 && !resid)
    return launch<R, S, true, false, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid, sm);
  if (norm && relu2 && !resid)
    return launch<R, S, true, true, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid, sm);
  if (!norm && !relu2 && resid)
    return launch<R, S, false, false, true>(s, x, w, b, g, sh, res, o, n, k, eps, grid, sm);
  if (!norm && !relu2 && !resid)
    return launch<R, S, false, false, false>(s, x, w, b, g, sh, res, o, n, k, eps, grid, sm);
  return cudaErrorInvalidValue;
}

ffi::Error ProjImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Buffer<ffi::BF16> bias, ffi::Buffer<ffi::BF16> scale,
                    ffi::Buffer<ffi::BF16> shift, ffi::Buffer<ffi::BF16> residual,
                    ffi::ResultBuffer<ffi::BF16> out, int64_t norm, int64_t relu2,
                    int64_t resid, int64_t rows, int64_t stages, int64_t grid, int64_t step_major, float eps) {
  const auto wd = w.dimensions();  // [N / G, K / 256, G, 256], step_major: [K / 256, N / G, ...]
  if (wd.size() != 4 || wd[3] != kStep || wd[2] % kWarps)
    return ffi::Error::InvalidArgument("w must be blocked [N / G, K / 256, G, 256], G % 8 == 0");
  const int g = static_cast<int>(wd[2]);
  const int n = static_cast<int>(wd[step_major ? 1 : 0]) * g;
  const int k = static_cast<int>(wd[step_major ? 0 : 1]) * kStep;
  if (rows != g / kWarps) return ffi::Error::InvalidArgument("rows must be G / 8");
  if (norm && k > kMaxJ * kThreads) return ffi::Error::InvalidArgument("LayerNorm: K > 4096");
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
                               eps, static_cast<int>(grid), step_major != 0);
  JAIS2_CASE(2, 3) JAIS2_CASE(2, 4) JAIS2_CASE(2, 6) JAIS2_CASE(4, 3) JAIS2_CASE(4, 4)
  JAIS2_CASE(4, 6) JAIS2_CASE(8, 2) JAIS2_CASE(8, 3) JAIS2_CASE(8, 4)
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
                                  .Attr<int64_t>("step_major")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

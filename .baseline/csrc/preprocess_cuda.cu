// CUDA version of preprocess_cpu (preprocess.h): one thread per output pixel, 4x4 taps per channel, same
// arithmetic and summation order as the CPU op (built with --fmad=false so no FMA contraction):
// h_k = ((s0*a0 + s1*a1) + s2*a2) + s3*a3 for each of the 4 source rows, then v = h0*b0 + h1*b1 + h2*b2 + h3*b3,
// then (v / 255 - mean) / std. Tap positions fx = (d + 0.5) * scale - 0.5, scale = 1 / (dst / src), and the
// Keys weights in double when both source sides are >= 4, else float, as OpenCV 5's INTER_CUBIC. Shapes: src (h, w, 3) uint8, dst (3, oh, ow) or (n_patches, 3*p*p).
#include <cuda_runtime.h>

#include <string>

#include "preprocess_cuda.h"

namespace pixtral {
namespace {

struct Params {
  const uint8_t* src;
  long long stride;
  float* dst;
  int h, w, oh, ow, layout, patch;
  double scale_x, scale_y;
  float mean[3], stdv[3];
};

template <typename T>
__device__ __forceinline__ void keys_weights(T x, float wt[4]) {  // Keys cubic, A = -0.75, evaluated in T
  const T A = T(-0.75);
  T w0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A;
  T w1 = ((A + 2) * x - (A + 3)) * x * x + 1;
  T w2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1;
  wt[0] = float(w0), wt[1] = float(w1), wt[2] = float(w2), wt[3] = float(T(1) - w0 - w1 - w2);
}

// double math when both source sides are >= 4, else float: the same choice as the CPU op (and OpenCV 5)
__device__ __forceinline__ void taps(int d, double scale, int src, bool precise, int idx[4], float wt[4]) {
  int sx;
  if (precise) {
    double fy = (d + 0.5) * scale - 0.5;
    sx = int(floor(fy));
    keys_weights<double>(fy - sx, wt);
  } else {
    float fx = float((d + 0.5) * scale - 0.5);
    sx = int(floorf(fx));
    keys_weights<float>(fx - float(sx), wt);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) idx[k] = min(max(sx - 1 + k, 0), src - 1);
}

__global__ void _preprocess_kernel(Params p) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= p.ow || y >= p.oh) return;
  int xi[4], yi[4];
  float xw[4], yw[4];
  const bool precise = min(p.h, p.w) >= 4;
  taps(x, p.scale_x, p.w, precise, xi, xw);
  taps(y, p.scale_y, p.h, precise, yi, yw);
  float v[3];
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    float acc = 0.f;
#pragma unroll
    for (int ky = 0; ky < 4; ++ky) {
      const uint8_t* row = p.src + (long long)yi[ky] * p.stride;
      float hsum = 0.f;
#pragma unroll
      for (int kx = 0; kx < 4; ++kx) hsum += float(__ldg(row + xi[kx] * 3 + c)) * xw[kx];
      acc = ky == 0 ? hsum * yw[0] : acc + hsum * yw[ky];
    }
    v[c] = (acc / 255.f - p.mean[c]) / p.stdv[c];
  }
  if (p.layout == 0) {
    const long long plane = (long long)p.oh * p.ow, o = (long long)y * p.ow + x;
#pragma unroll
    for (int c = 0; c < 3; ++c) p.dst[c * plane + o] = v[c];
  } else {
    const int P = p.patch, n = (y / P) * (p.ow / P) + x / P, ky = y % P, kx = x % P;
    float* o = p.dst + (long long)n * 3 * P * P + ky * P + kx;
#pragma unroll
    for (int c = 0; c < 3; ++c) o[c * P * P] = v[c];
  }
}

}  // namespace

std::string preprocess_cuda(const PreprocessCudaArgs& a, void* stream, int device) {
  if (a.h < 1 || a.w < 1 || a.oh < 1 || a.ow < 1) return "preprocess_cuda: sizes must be positive";
  if (a.src_row_stride < (int64_t)a.w * 3) return "preprocess_cuda: src_row_stride < 3 * width";
  if (a.layout == 1 && (a.patch < 1 || a.oh % a.patch || a.ow % a.patch))
    return "preprocess_cuda: out size not a multiple of the patch size";
  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return std::string("preprocess_cuda: ") + cudaGetErrorString(err);
  Params p;
  p.src = a.src;
  p.stride = a.src_row_stride;
  p.dst = a.dst;
  p.h = a.h, p.w = a.w, p.oh = a.oh, p.ow = a.ow, p.layout = a.layout, p.patch = a.patch;
  p.scale_x = 1.0 / (double(a.ow) / double(a.w));
  p.scale_y = 1.0 / (double(a.oh) / double(a.h));
  for (int c = 0; c < 3; ++c) p.mean[c] = a.mean[c], p.stdv[c] = a.std[c];
  dim3 block(32, 8), grid((a.ow + 31) / 32, (a.oh + 7) / 8);
  _preprocess_kernel<<<grid, block, 0, (cudaStream_t)stream>>>(p);
  err = cudaGetLastError();
  if (prev >= 0 && prev != device) cudaSetDevice(prev);
  return err == cudaSuccess ? std::string() : std::string("preprocess_cuda: ") + cudaGetErrorString(err);
}

}  // namespace pixtral

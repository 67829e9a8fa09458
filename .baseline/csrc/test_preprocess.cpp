// ctest for the CPU op (and the CUDA op when built with PIXTRAL_RT_CUDA and a GPU is present).
// Checks: taps (clamped, weights sum to 1, identity at scale 1); identity resize == normalised input
// exactly; a constant image stays constant; agreement with an independent double-precision direct 2D
// bicubic reference on awkward sizes (|err| <= 1e-4 after normalisation, the bound); thread-count
// independence (bit-identical); CUDA == CPU (<= 1e-4) in both layouts.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "preprocess.h"
#ifdef PIXTRAL_RT_CUDA
#include <cuda_runtime.h>

#include "preprocess_cuda.h"
#endif

using pixtral::Normalize;

static int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                   \
      std::fprintf(stderr, "\n");                          \
    }                                                      \
  } while (0)

static const Normalize kNorm = {{0.48145466f, 0.4578275f, 0.40821073f}, {0.26862954f, 0.26130258f, 0.27577711f}};

static double keys(double t) {  // Keys cubic kernel, A = -0.75
  const double A = -0.75;
  t = std::fabs(t);
  if (t <= 1) return ((A + 2) * t - (A + 3)) * t * t + 1;
  if (t < 2) return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A;
  return 0;
}

// Direct 2D reference in double: output pixel centre maps to (d + 0.5) * src / dst - 0.5, replicated border.
static std::vector<double> reference(const std::vector<uint8_t>& img, int h, int w, int oh, int ow) {
  std::vector<double> out(size_t(3) * oh * ow);
  for (int y = 0; y < oh; ++y) {
    double fy = (y + 0.5) * h / oh - 0.5;
    int sy = int(std::floor(fy));
    for (int x = 0; x < ow; ++x) {
      double fx = (x + 0.5) * w / ow - 0.5;
      int sx = int(std::floor(fx));
      for (int c = 0; c < 3; ++c) {
        double v = 0;
        for (int j = -1; j <= 2; ++j)
          for (int i = -1; i <= 2; ++i) {
            int yy = std::min(std::max(sy + j, 0), h - 1), xx = std::min(std::max(sx + i, 0), w - 1);
            v += keys(fy - (sy + j)) * keys(fx - (sx + i)) * img[(size_t(yy) * w + xx) * 3 + c];
          }
        out[(size_t(c) * oh + y) * ow + x] = (v / 255.0 - kNorm.mean[c]) / kNorm.std[c];
      }
    }
  }
  return out;
}

static std::vector<uint8_t> random_image(int h, int w, unsigned seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> img(size_t(h) * w * 3);
  for (auto& v : img) v = uint8_t(g() & 255);
  return img;
}

static std::vector<float> run_cpu(const std::vector<uint8_t>& img, int h, int w, int oh, int ow, int threads) {
  std::vector<float> out(size_t(3) * oh * ow, NAN);  // poisoned
  pixtral::preprocess_cpu(img.data(), h, w, int64_t(w) * 3, out.data(), oh, ow, kNorm, threads);
  return out;
}

static void test_taps() {
  const int sizes[][2] = {{1, 16}, {17, 16}, {1500, 1024}, {1024, 1024}, {5000, 1024}, {40, 48}};
  for (auto& s : sizes) {
    auto t = pixtral::cubic_taps(s[0], s[1], s[0] % 2 == 0);
    for (int d = 0; d < s[1]; ++d) {
      float sum = 0;
      for (int k = 0; k < 4; ++k) {
        int i = t.idx[size_t(d) * 4 + k];
        CHECK(i >= 0 && i < s[0], "tap index %d out of [0, %d)", i, s[0]);
        sum += t.w[size_t(d) * 4 + k];
      }
      CHECK(std::fabs(sum - 1.f) < 1e-5f, "taps %d->%d: weights of %d sum to %f", s[0], s[1], d, sum);
    }
  }
  auto id = pixtral::cubic_taps(7, 7, false);
  for (int d = 0; d < 7; ++d)
    CHECK(id.w[d * 4 + 1] == 1.f && id.idx[d * 4 + 1] == d, "identity taps wrong at %d", d);
}

static void test_identity_and_constant() {
  const int h = 33, w = 47;
  auto img = random_image(h, w, 1);
  auto out = run_cpu(img, h, w, h, w, 2);
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < h * w; ++i) {
      float want = (float(img[size_t(i) * 3 + c]) / 255.f - kNorm.mean[c]) / kNorm.std[c];
      CHECK(out[size_t(c) * h * w + i] == want, "identity resize changed pixel %d channel %d", i, c);
    }
  std::vector<uint8_t> flat(size_t(20) * 30 * 3, 200);
  auto o2 = run_cpu(flat, 20, 30, 64, 16, 3);
  for (int c = 0; c < 3; ++c) {
    float want = (200.f / 255.f - kNorm.mean[c]) / kNorm.std[c];
    for (int i = 0; i < 64 * 16; ++i)
      CHECK(std::fabs(o2[size_t(c) * 64 * 16 + i] - want) < 1e-5f, "constant image not constant at %d", i);
  }
}

static void test_reference_and_threads() {
  const int cases[][4] = {{1, 1, 16, 16},     {17, 15, 32, 16},  {16, 16, 16, 16}, {1500, 17, 1024, 16},
                          {200, 5000, 48, 1024}, {40, 100, 48, 112}, {257, 301, 128, 144}, {1023, 1025, 1024, 1024}};
  unsigned seed = 7;
  for (auto& c : cases) {
    const int h = c[0], w = c[1], oh = c[2], ow = c[3];
    auto img = random_image(h, w, seed++);
    auto ref = reference(img, h, w, oh, ow);
    auto one = run_cpu(img, h, w, oh, ow, 1);
    auto many = run_cpu(img, h, w, oh, ow, 5);
    double err = 0;
    bool same = true;
    for (size_t i = 0; i < ref.size(); ++i) {
      err = std::max(err, std::fabs(double(one[i]) - ref[i]));
      same = same && (one[i] == many[i]);
    }
    CHECK(err <= 1e-4, "%dx%d -> %dx%d: max |cpu - reference| = %g > 1e-4", h, w, oh, ow, err);
    CHECK(same, "%dx%d -> %dx%d: 1 thread and 5 threads differ", h, w, oh, ow);
    std::printf("cpu %5dx%-5d -> %4dx%-4d max err vs double reference %.3g\n", h, w, oh, ow, err);
  }
}

#ifdef PIXTRAL_RT_CUDA
static int test_cuda() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("no CUDA device: CUDA test skipped\n");
    return 0;
  }
  const int cases[][4] = {{3000, 4000, 768, 1024}, {17, 15, 32, 16}, {1500, 17, 1024, 16}, {1023, 1025, 1024, 1024}};
  for (auto& c : cases) {
    const int h = c[0], w = c[1], oh = c[2], ow = c[3], P = 16;
    auto img = random_image(h, w, 99);
    auto cpu = run_cpu(img, h, w, oh, ow, 0);
    uint8_t* dsrc;
    float* ddst;
    size_t nout = size_t(3) * oh * ow;
    cudaMalloc(&dsrc, img.size());
    cudaMalloc(&ddst, nout * sizeof(float));
    cudaMemcpy(dsrc, img.data(), img.size(), cudaMemcpyHostToDevice);
    for (int layout = 0; layout < 2; ++layout) {
      cudaMemset(ddst, 0xff, nout * sizeof(float));  // NaN poison
      pixtral::PreprocessCudaArgs a{dsrc, h, w, int64_t(w) * 3, ddst, oh, ow, layout, P, {}, {}};
      for (int k = 0; k < 3; ++k) a.mean[k] = kNorm.mean[k], a.std[k] = kNorm.std[k];
      std::string err = pixtral::preprocess_cuda(a, nullptr, 0);
      CHECK(err.empty(), "cuda launch: %s", err.c_str());
      std::vector<float> gpu(nout);
      cudaMemcpy(gpu.data(), ddst, nout * sizeof(float), cudaMemcpyDeviceToHost);
      double e = 0;
      for (int ch = 0; ch < 3; ++ch)
        for (int y = 0; y < oh; ++y)
          for (int x = 0; x < ow; ++x) {
            size_t g = layout == 0 ? (size_t(ch) * oh + y) * ow + x
                                   : (size_t((y / P) * (ow / P) + x / P) * 3 + ch) * P * P + (y % P) * P + x % P;
            double d = std::fabs(double(gpu[g]) - cpu[(size_t(ch) * oh + y) * ow + x]);
            e = std::isnan(d) ? 1e9 : std::max(e, d);
          }
      CHECK(e <= 1e-4, "cuda layout %d %dx%d -> %dx%d: max |gpu - cpu| = %g", layout, h, w, oh, ow, e);
      std::printf("cuda layout %d %5dx%-5d -> %4dx%-4d max |gpu - cpu| %.3g\n", layout, h, w, oh, ow, e);
    }
    cudaFree(dsrc);
    cudaFree(ddst);
  }
  return 0;
}
#endif

int main() {
  test_taps();
  test_identity_and_constant();
  test_reference_and_threads();
#ifdef PIXTRAL_RT_CUDA
  test_cuda();
#endif
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all preprocessing checks passed\n");
  return 0;
}

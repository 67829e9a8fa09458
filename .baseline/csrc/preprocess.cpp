// CPU preprocessing: banded over output rows, one std::thread per band, no shared writes.
// Each band runs the horizontal pass over just the source rows its output rows read (<= 3 rows of
// overlap with its neighbours are recomputed), then the vertical pass and normalisation into CHW.
#include "preprocess.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>

namespace pixtral {

template <typename T>
static void keys_weights(T x, float* w) {  // Keys cubic, A = -0.75, evaluated in T
  const T A = T(-0.75);
  T w0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A;
  T w1 = ((A + 2) * x - (A + 3)) * x * x + 1;
  T w2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1;
  w[0] = float(w0), w[1] = float(w1), w[2] = float(w2), w[3] = float(T(1) - w0 - w1 - w2);
}

CubicTaps cubic_taps(int src, int dst, bool precise) {
  if (src < 1 || dst < 1) throw std::invalid_argument("cubic_taps: sizes must be positive");
  CubicTaps t;
  t.idx.resize(size_t(dst) * 4);
  t.w.resize(size_t(dst) * 4);
  const double scale = 1.0 / (double(dst) / double(src));  // OpenCV: scale = 1 / inv_scale
  for (int d = 0; d < dst; ++d) {
    int sx;
    if (precise) {  // OpenCV 5, both source sides >= 4: positions and weights in double
      double fy = (d + 0.5) * scale - 0.5;
      sx = int(std::floor(fy));
      keys_weights<double>(fy - sx, &t.w[size_t(d) * 4]);
    } else {        // OpenCV's generic path (a source side < 4): in float
      float fx = float((d + 0.5) * scale - 0.5);
      sx = int(std::floor(fx));
      keys_weights<float>(fx - float(sx), &t.w[size_t(d) * 4]);
    }
    for (int k = 0; k < 4; ++k) t.idx[size_t(d) * 4 + k] = std::min(std::max(sx - 1 + k, 0), src - 1);
  }
  return t;
}

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : int(std::min(n, 64u));
}

namespace {

void run_band(const uint8_t* src, int64_t stride, int ow, int oh, const CubicTaps& tx, const CubicTaps& ty,
              const Normalize& norm, float* dst, int y0, int y1) {
  if (y0 >= y1) return;
  int lo = ty.idx[size_t(y0) * 4], hi = ty.idx[size_t(y1 - 1) * 4 + 3];  // idx is monotone in d
  const int nrows = hi - lo + 1, rw = ow * 3;
  std::vector<float> tmp(size_t(nrows) * rw);
  for (int r = 0; r < nrows; ++r) {  // horizontal pass: (nrows, ow, 3)
    const uint8_t* s = src + int64_t(lo + r) * stride;
    float* o = &tmp[size_t(r) * rw];
    for (int x = 0; x < ow; ++x) {
      const int32_t* id = &tx.idx[size_t(x) * 4];
      const float* a = &tx.w[size_t(x) * 4];
      for (int c = 0; c < 3; ++c) {
        float v = 0.f;
        for (int k = 0; k < 4; ++k) v += float(s[id[k] * 3 + c]) * a[k];
        o[x * 3 + c] = v;
      }
    }
  }
  const size_t plane = size_t(oh) * ow;
  float stdv[3], mean[3];
  for (int c = 0; c < 3; ++c) mean[c] = norm.mean[c], stdv[c] = norm.std[c];
  for (int y = y0; y < y1; ++y) {  // vertical pass + normalise, written CHW
    const int32_t* id = &ty.idx[size_t(y) * 4];
    const float* b = &ty.w[size_t(y) * 4];
    const float* r0 = &tmp[size_t(id[0] - lo) * rw];
    const float* r1 = &tmp[size_t(id[1] - lo) * rw];
    const float* r2 = &tmp[size_t(id[2] - lo) * rw];
    const float* r3 = &tmp[size_t(id[3] - lo) * rw];
    for (int c = 0; c < 3; ++c) {
      float* o = dst + c * plane + size_t(y) * ow;
      for (int x = 0; x < ow; ++x) {
        const int j = x * 3 + c;
        float v = r0[j] * b[0] + r1[j] * b[1] + r2[j] * b[2] + r3[j] * b[3];
        o[x] = (v / 255.f - mean[c]) / stdv[c];
      }
    }
  }
}

}  // namespace

void preprocess_cpu(const uint8_t* src, int h, int w, int64_t src_row_stride, float* dst, int oh, int ow,
                    const Normalize& norm, int threads) {
  if (h < 1 || w < 1 || oh < 1 || ow < 1)
    throw std::invalid_argument("preprocess: sizes must be positive, got src " + std::to_string(h) + "x" +
                                std::to_string(w) + " dst " + std::to_string(oh) + "x" + std::to_string(ow));
  if (src_row_stride < int64_t(w) * 3) throw std::invalid_argument("preprocess: src_row_stride < 3 * width");
  const bool precise = std::min(h, w) >= 4;  // OpenCV 5's choice of code path
  const CubicTaps tx = cubic_taps(w, ow, precise), ty = cubic_taps(h, oh, precise);
  int n = threads > 0 ? threads : default_threads();
  n = std::max(1, std::min(n, (oh + 15) / 16));  // >= 16 output rows per band
  if (n == 1) {
    run_band(src, src_row_stride, ow, oh, tx, ty, norm, dst, 0, oh);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int i = 0; i < n; ++i) {
    int y0 = int(int64_t(oh) * i / n), y1 = int(int64_t(oh) * (i + 1) / n);
    pool.emplace_back(run_band, src, src_row_stride, ow, oh, std::cref(tx), std::cref(ty), std::cref(norm), dst,
                      y0, y1);
  }
  for (auto& t : pool) t.join();
}

}  // namespace pixtral

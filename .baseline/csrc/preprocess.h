// Pixtral image preprocessing, exactly as mistral_common defines it (no torch, no Python here).
//
//   uint8 RGB (h, w, 3), row stride in bytes  ->  float32 (3, oh, ow), CHW
//   resize: OpenCV INTER_CUBIC on float pixels: Keys cubic A = -0.75, pixel-centre alignment
//           fx = (dx + 0.5) * (1 / (ow / w)) - 0.5 and the Keys weights in double (rounded to float) when both
//           source sides are >= 4, else in float (OpenCV's generic path), as measured against OpenCV 5;
//           replicated border, no antialias, no clamping;
//           horizontal pass then vertical pass, sums in float in tap order (as OpenCV's resizeGeneric)
//   normalise: v = (x / 255 - mean[c]) / std[c]
#pragma once

#include <cstdint>
#include <vector>

namespace pixtral {

// Taps along one axis for a resize src -> dst (precise: double math, see the header comment): idx (dst * 4) clamped to [0, src - 1], weights (dst * 4).
struct CubicTaps {
  std::vector<int32_t> idx;
  std::vector<float> w;
};
CubicTaps cubic_taps(int src, int dst, bool precise);

struct Normalize {
  float mean[3];
  float std[3];
};

// threads <= 0: a default from the machine's core count and the output size.
void preprocess_cpu(const uint8_t* src, int h, int w, int64_t src_row_stride, float* dst, int oh, int ow,
                    const Normalize& norm, int threads);

int default_threads();

}  // namespace pixtral

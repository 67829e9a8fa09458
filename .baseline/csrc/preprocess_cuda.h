// CUDA preprocessing launcher: plain C++ declarations (no CUDA or torch headers), so the pybind11 binding
// can be compiled by the host compiler and linked with the nvcc-built object.
#pragma once

#include <cstdint>
#include <string>

namespace pixtral {

struct PreprocessCudaArgs {
  const uint8_t* src;      // device, uint8 RGB (h, w, 3), rows src_row_stride bytes apart
  int h, w;
  int64_t src_row_stride;
  float* dst;              // device, float32: layout 0 (3, oh, ow); layout 1 (oh/p * ow/p, 3 * p * p)
  int oh, ow;
  int layout;              // 0 = CHW, 1 = patches row-major, each patch (c, ky, kx)
  int patch;               // patch size for layout 1
  float mean[3], std[3];
};

// Enqueues the kernel on `stream` (a cudaStream_t, 0 = default) of device `device`. Returns "" on success,
// else the CUDA error text. No host synchronisation.
std::string preprocess_cuda(const PreprocessCudaArgs& args, void* stream, int device);

}  // namespace pixtral

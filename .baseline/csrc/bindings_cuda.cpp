// pybind11 bindings of the CUDA op as pixtral_rt._C_cuda. Raw device pointers and a stream handle in
// (from torch's data_ptr() / cuda_stream on the Python side); no torch or CUDA headers here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "preprocess_cuda.h"

namespace py = pybind11;

namespace {

void preprocess(uintptr_t src, int h, int w, int64_t src_row_stride, uintptr_t dst, int out_h, int out_w, int layout,
                int patch, std::array<float, 3> mean, std::array<float, 3> std, uintptr_t stream, int device) {
  if (src == 0 || dst == 0) throw std::invalid_argument("preprocess: src and dst must be device pointers, got 0");
  if (layout != 0 && layout != 1) throw std::invalid_argument("preprocess: layout must be 0 (CHW) or 1 (patches)");
  pixtral::PreprocessCudaArgs a{};
  a.src = reinterpret_cast<const uint8_t*>(src);
  a.h = h, a.w = w, a.src_row_stride = src_row_stride;
  a.dst = reinterpret_cast<float*>(dst);
  a.oh = out_h, a.ow = out_w, a.layout = layout, a.patch = patch;
  for (int c = 0; c < 3; ++c) a.mean[c] = mean[c], a.std[c] = std[c];
  std::string err = pixtral::preprocess_cuda(a, reinterpret_cast<void*>(stream), device);
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pixtral_rt native CUDA ops: mistral_common-exact image preprocessing on the device";
  m.def("preprocess", &preprocess, py::arg("src"), py::arg("h"), py::arg("w"), py::arg("src_row_stride"),
        py::arg("dst"), py::arg("out_h"), py::arg("out_w"), py::arg("layout"), py::arg("patch"), py::arg("mean"),
        py::arg("std"), py::arg("stream"), py::arg("device"),
        "enqueue resize + normalise: uint8 RGB (h, w, 3) at src -> float32 at dst (layout 0: (3, out_h, out_w); "
        "1: (n_patches, 3 * patch * patch)) on `stream`; no host sync");
}

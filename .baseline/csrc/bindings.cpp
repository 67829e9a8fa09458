// pybind11 bindings of the CPU op as pixtral_rt._C. numpy buffers in and out; no torch headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "preprocess.h"

namespace py = pybind11;

namespace {

using U8Array = py::array_t<uint8_t, py::array::c_style>;

py::array_t<float> preprocess(U8Array src, int out_h, int out_w, std::array<float, 3> mean, std::array<float, 3> std,
                              int threads) {
  if (src.ndim() != 3 || src.shape(2) != 3)
    throw std::invalid_argument("preprocess: src must be uint8 (H, W, 3) RGB, got ndim " + std::to_string(src.ndim()));
  if (out_h < 1 || out_w < 1)
    throw std::invalid_argument("preprocess: out_h, out_w must be positive, got " + std::to_string(out_h) + ", " +
                                std::to_string(out_w));
  const int h = int(src.shape(0)), w = int(src.shape(1));
  if (h < 1 || w < 1) throw std::invalid_argument("preprocess: src is empty");
  pixtral::Normalize norm{};
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.f)) throw std::invalid_argument("preprocess: std must be positive");
    norm.mean[c] = mean[c];
    norm.std[c] = std[c];
  }
  py::array_t<float> out({py::ssize_t(3), py::ssize_t(out_h), py::ssize_t(out_w)});
  const uint8_t* s = src.data();
  float* d = out.mutable_data();
  {
    py::gil_scoped_release release;
    pixtral::preprocess_cpu(s, h, w, int64_t(w) * 3, d, out_h, out_w, norm, threads);
  }
  return out;
}

py::tuple cubic_taps(int src, int dst, bool precise) {
  auto t = pixtral::cubic_taps(src, dst, precise);
  py::array_t<int32_t> idx({py::ssize_t(dst), py::ssize_t(4)});
  py::array_t<float> w({py::ssize_t(dst), py::ssize_t(4)});
  std::copy(t.idx.begin(), t.idx.end(), idx.mutable_data());
  std::copy(t.w.begin(), t.w.end(), w.mutable_data());
  return py::make_tuple(idx, w);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pixtral_rt native CPU ops: mistral_common-exact image preprocessing (multi-threaded C++)";
  m.def("preprocess", &preprocess, py::arg("src"), py::arg("out_h"), py::arg("out_w"), py::arg("mean"),
        py::arg("std"), py::arg("threads") = 0,
        "uint8 RGB (H, W, 3) -> float32 (3, out_h, out_w): OpenCV INTER_CUBIC resize, /255, (x - mean) / std");
  m.def("cubic_taps", &cubic_taps, py::arg("src"), py::arg("dst"), py::arg("precise") = true,
        "OpenCV INTER_CUBIC taps for one axis: (idx int32 (dst, 4), weights float32 (dst, 4))");
  m.def("num_threads", &pixtral::default_threads, "default worker threads (hardware concurrency, <= 64)");
}

// What every bindings file shares: numpy arrays both ways, lenient UTF-8, steering buffers.
#pragma once

#include "session.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace caa {

using FloatMatrix = nanobind::ndarray<const float, nanobind::ndim<2>, nanobind::c_contig, nanobind::device::cpu>;

// One way to hand a result vector to Python: a numpy array that owns it (no copy).
template <typename T>
nanobind::ndarray<nanobind::numpy, T> to_numpy(std::vector<T> && values, std::initializer_list<size_t> shape) {
    auto * heap = new std::vector<T>(std::move(values));
    nanobind::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return nanobind::ndarray<nanobind::numpy, T>(heap->data(), shape, owner);
}

// Decodes UTF-8 leniently: a token can hold half a character.
inline nanobind::str lenient_str(const std::string & s) {
    PyObject * obj = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
    if (obj == nullptr) {
        throw nanobind::python_error();
    }
    return nanobind::steal<nanobind::str>(obj);
}

// A steering buffer from Python: (n_layer - 1, n_embd) float32 from layer 1, layers il_start..il_end.
inline Steering to_steering(const Model & m, FloatMatrix buf, int32_t il_start, int32_t il_end) {
    if (buf.shape(0) != static_cast<size_t>(m.n_layer() - 1) || buf.shape(1) != static_cast<size_t>(m.n_embd())) {
        throw std::invalid_argument("steering buffer has shape (" + std::to_string(buf.shape(0)) + ", " +
                                    std::to_string(buf.shape(1)) + "), expected (n_layer - 1, n_embd) = (" +
                                    std::to_string(m.n_layer() - 1) + ", " + std::to_string(m.n_embd()) + ")");
    }
    Steering steering;
    steering.data.assign(buf.data(), buf.data() + buf.size());
    steering.il_start = il_start;
    steering.il_end = il_end;
    return steering;
}

} // namespace caa

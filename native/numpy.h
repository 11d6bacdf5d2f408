// One way to hand a result vector to Python: a numpy array that owns it (no copy).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <vector>

namespace caa {

template <typename T>
nanobind::ndarray<nanobind::numpy, T> to_numpy(std::vector<T> && values, std::initializer_list<size_t> shape) {
    auto * heap = new std::vector<T>(std::move(values));
    nanobind::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return nanobind::ndarray<nanobind::numpy, T>(heap->data(), shape, owner);
}

} // namespace caa

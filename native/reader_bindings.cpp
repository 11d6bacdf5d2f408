// Python bindings of the extraction reader: caa_local.engine._native.Reader.
#include "bindings.h"
#include "reader.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

void bind_reader(nb::module_ & m) {
    nb::class_<caa::Reader>(m, "Reader")
        .def(nb::init<const caa::Session &, std::vector<llama_token>, std::vector<int32_t>, int32_t, int32_t>(),
             "session"_a, "prefix"_a, "layers"_a, "max_pairs"_a, "max_len"_a,
             nb::call_guard<nb::gil_scoped_release>(),
             "A context of its own on the session's model, with `prefix` (the tokens every prompt starts "
             "with) decoded once; reads the outputs of blocks `layers` (l_out-N).")
        .def_prop_ro("max_pairs", &caa::Reader::max_pairs)
        .def_prop_ro("n_layers", &caa::Reader::n_layers)
        .def_prop_ro("prefix_len", &caa::Reader::prefix_len)
        .def(
            "read",
            [](caa::Reader & r, const std::vector<std::vector<llama_token>> & seqs, const std::vector<int32_t> & shared,
               const std::vector<int32_t> & n_read) {
                std::vector<float> out;
                {
                    nb::gil_scoped_release release;
                    out = r.read(seqs, shared, n_read, [] {
                        nb::gil_scoped_acquire gil;
                        if (PyErr_CheckSignals() != 0) {
                            throw nb::python_error();
                        }
                    });
                }
                return caa::to_numpy(std::move(out), {shared.size(), 2, static_cast<size_t>(r.n_layers()),
                                                      static_cast<size_t>(r.n_embd())});
            },
            "seqs"_a, "shared"_a, "n_read"_a,
            "Per pair (seqs[2p] matching, seqs[2p+1] not matching, shared[p] tokens in common), the mean "
            "block output over the last n_read tokens of each: (n_pairs, 2, n_layers, n_embd) float32.");
}

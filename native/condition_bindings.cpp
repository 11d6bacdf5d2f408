// Python bindings of the condition probe: caa_local.engine._native.RowProbe.
#include "bindings.h"
#include "condition.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

void bind_condition(nb::module_ & m) {
    nb::class_<caa::RowProbe>(m, "RowProbe")
        .def_static("attach", &caa::RowProbe::attach, "session"_a, "layers"_a, nb::keep_alive<0, 1>(),
                    "Watch blocks `layers` (l_out-N, N in 0..n_layer-2) of the session: its context is "
                    "rebuilt with the probe's eval callback (the KV cache is dropped).")
        .def_prop_ro("layers", &caa::RowProbe::layers)
        .def("arm", &caa::RowProbe::arm, "begin"_a, "end"_a,
             "Read rows begin..end-1 of the tokens decoded from now on (counted from the first).")
        .def("disarm", &caa::RowProbe::disarm)
        .def_prop_ro("count", &caa::RowProbe::count, "Rows read since arm() (every watched block).")
        .def(
            "means",
            [](const caa::RowProbe & p) {
                return caa::to_numpy(p.means(), {p.layers().size(), static_cast<size_t>(p.n_embd())});
            },
            "Mean of the rows read, per watched block: (n_layers, n_embd) float32.");
}

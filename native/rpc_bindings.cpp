// Python bindings of llama.cpp's RPC backend: caa_local.engine._native.rpc_available, rpc_serve.
#include "rpc.h"

#include <ggml-rpc.h>
#include <ggml.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdio>
#include <cstring>
#include <unistd.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ggml-rpc aborts the process when a worker goes away mid-decode (it cannot recover); say
// so in one line and exit with status 1 instead of a backtrace and a core dump.
void rpc_abort(const char * message) {
    const bool rpc = std::strstr(message, "ggml-rpc") != nullptr || std::strstr(message, "RPC") != nullptr;
    std::fprintf(stderr, "Error: llama.cpp stopped: %s%s\n", message,
                 rpc ? " (an RPC worker went away or failed; llama.cpp cannot continue without it: "
                       "start caa-local again once the worker is back)"
                     : "");
    std::fflush(stderr);
    _exit(1);
}

} // namespace

void bind_rpc(nb::module_ & m) {
    m.attr("RPC_PROTO_MAJOR") = RPC_PROTO_MAJOR_VERSION;
    m.attr("RPC_PROTO_MINOR") = RPC_PROTO_MINOR_VERSION;
    m.def("rpc_available", &caa::rpc_available, "Whether this llama.cpp was built with GGML_RPC.");
    m.def("rpc_abort_message", [] { ggml_set_abort_callback(rpc_abort); },
          "From now on a llama.cpp abort (e.g. an RPC worker lost mid-decode) prints one Error: line "
          "and exits with status 1.");
    m.def(
        "rpc_serve",
        [](const std::string & endpoint, const std::string & cache_dir, int32_t n_threads) {
            caa::rpc_serve(endpoint, cache_dir, n_threads);
        },
        "endpoint"_a, "cache_dir"_a = "", "n_threads"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
        "Serve this machine's devices to llama.cpp RPC clients at endpoint (host:port) until the "
        "process ends; raises RuntimeError if it cannot listen.");
}

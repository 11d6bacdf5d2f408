// Python bindings of llama.cpp's RPC backend: caa_local.engine._native.rpc_available, rpc_serve.
#include "rpc.h"

#include <ggml-rpc.h>
#include <ggml.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <unistd.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

int lost_exit_code = 1;
PyObject * lost_hook = nullptr; // owned; called with the message, with the GIL

// ggml-rpc aborts the process when a worker goes away mid-decode (it cannot recover). Say so
// in one line; then either hand over to the hook (a server answers its open requests and
// exits by itself; this thread, whichever it is, waits for that) or exit at once, instead of
// a backtrace and a core dump.
void rpc_abort(const char * message) {
    const bool rpc = std::strstr(message, "ggml-rpc") != nullptr || std::strstr(message, "RPC") != nullptr;
    std::fprintf(stderr, "Error: llama.cpp stopped: %s%s\n", message,
                 rpc ? " (an RPC worker went away or failed; llama.cpp cannot continue without it: "
                       "start caa-local again once the worker is back)"
                     : "");
    std::fflush(stderr);
    if (lost_hook != nullptr) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject * r = PyObject_CallFunction(lost_hook, "s", message);
        Py_XDECREF(r);
        PyErr_Clear();
        PyGILState_Release(gil);
        for (;;) {
            std::this_thread::sleep_for(std::chrono::hours(1));
        }
    }
    _exit(lost_exit_code);
}

} // namespace

void bind_rpc(nb::module_ & m) {
    m.attr("RPC_PROTO_MAJOR") = RPC_PROTO_MAJOR_VERSION;
    m.attr("RPC_PROTO_MINOR") = RPC_PROTO_MINOR_VERSION;
    m.def("rpc_available", &caa::rpc_available, "Whether this llama.cpp was built with GGML_RPC.");
    m.def(
        "rpc_on_lost",
        [](int exit_code, nb::object hook) {
            lost_exit_code = exit_code;
            Py_XDECREF(lost_hook);
            lost_hook = hook.is_none() ? nullptr : hook.inc_ref().ptr();
            ggml_set_abort_callback(rpc_abort);
        },
        "exit_code"_a = 1, "hook"_a = nb::none(),
        "From now on a llama.cpp abort (e.g. an RPC worker lost mid-decode) prints one Error: line, "
        "then calls hook(message) and blocks the aborting thread (the hook ends the process), or "
        "with no hook exits with exit_code.");
    m.def(
        "rpc_serve",
        [](const std::string & endpoint, const std::string & cache_dir, int32_t n_threads) {
            caa::rpc_serve(endpoint, cache_dir, n_threads);
        },
        "endpoint"_a, "cache_dir"_a = "", "n_threads"_a = 0, nb::call_guard<nb::gil_scoped_release>(),
        "Serve this machine's devices to llama.cpp RPC clients at endpoint (host:port) until the "
        "process ends; raises RuntimeError if it cannot listen.");
}

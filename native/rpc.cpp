#include "rpc.h"

#include "session.h" // pick_threads

#include <ggml-rpc.h>

#include <stdexcept>

namespace caa {

namespace {

ggml_backend_reg_t rpc_reg() {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (reg == nullptr) {
        throw std::runtime_error(
            "this llama-cpp-python was built without llama.cpp's RPC backend; reinstall it with it: "
            "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36");
    }
    return reg;
}

template <typename Fn> Fn rpc_proc(const char * name) {
    auto * fn = reinterpret_cast<Fn>(ggml_backend_reg_get_proc_address(rpc_reg(), name));
    if (fn == nullptr) {
        throw std::runtime_error(std::string("llama.cpp's RPC backend has no ") + name);
    }
    return fn;
}

} // namespace

bool rpc_available() { return ggml_backend_reg_by_name("RPC") != nullptr; }

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> & endpoints) {
    auto add_server = rpc_proc<decltype(&ggml_backend_rpc_add_server)>("ggml_backend_rpc_add_server");
    std::vector<ggml_backend_dev_t> devices;
    for (const std::string & endpoint : endpoints) {
        ggml_backend_reg_t reg = add_server(endpoint.c_str()); // the same reg again for a known endpoint
        if (reg == nullptr || ggml_backend_reg_dev_count(reg) == 0) {
            throw std::runtime_error("RPC worker " + endpoint + " offers no device");
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
            devices.push_back(ggml_backend_reg_dev_get(reg, i));
        }
    }
    return devices;
}

void rpc_serve(const std::string & endpoint, const std::string & cache_dir, int32_t n_threads) {
    auto start = rpc_proc<decltype(&ggml_backend_rpc_start_server)>("ggml_backend_rpc_start_server");
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        const bool remote = ggml_backend_dev_backend_reg(dev) == rpc_reg();
        if ((type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) && !remote) {
            devices.push_back(dev);
        }
    }
    if (devices.empty()) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu == nullptr) {
            throw std::runtime_error("llama.cpp has no device to serve");
        }
        devices.push_back(cpu);
    }
    start(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), pick_threads(n_threads), devices.size(),
          devices.data());
    throw std::runtime_error("the RPC worker could not listen on " + endpoint + " (port in use?)");
}

} // namespace caa

// llama.cpp's RPC backend (ggml-rpc), reached through ggml's backend registry, as llama.cpp's own
// --rpc and rpc-server do: nothing here links libggml-rpc, so a llama.cpp built without
// GGML_RPC still loads this extension and gets a clear error only when RPC is asked for.
#pragma once

#include <ggml-backend.h>

#include <cstdint>
#include <string>
#include <vector>

namespace caa {

// Whether this llama.cpp was built with GGML_RPC.
bool rpc_available();

// The devices of the RPC workers at `endpoints` ("host:port"), in order (ggml keeps one
// connection per endpoint for the life of the process; they are not added to ggml's global
// device list, so a model loaded without them never offloads there). The worker must be reachable: ggml-rpc aborts the
// process when it cannot connect, so callers check the endpoints first (caa_local/core/rpc.py).
std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string> & endpoints);

// Serves this machine's devices (every GPU, else the CPU) to RPC clients at `endpoint`, one
// client at a time, until the process ends. cache_dir "" disables llama.cpp's tensor cache;
// n_threads <= 0: every hardware thread.
void rpc_serve(const std::string & endpoint, const std::string & cache_dir, int32_t n_threads);

} // namespace caa

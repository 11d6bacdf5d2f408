#include "model.h"

#include "rpc.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace caa {

namespace {

void quiet_log(ggml_log_level level, const char * text, void * /*user*/) {
    const char * wanted = std::getenv("CAA_LOCAL_LLAMA_LOG"); // unset: silent; any: errors; "all": all
    if (wanted != nullptr && (level == GGML_LOG_LEVEL_ERROR || std::strcmp(wanted, "all") == 0)) {
        std::fputs(text, stderr);
    }
}

} // namespace

Model::Model(const std::string & path, int32_t n_gpu_layers, const std::vector<std::string> & rpc_endpoints,
             llama_flash_attn_type flash_attn)
    : flash_attn_(flash_attn) {
    static const bool backend_ready = [] {
        llama_log_set(quiet_log, nullptr);
        llama_backend_init();
        return true;
    }();
    (void) backend_ready;
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = n_gpu_layers;
    std::vector<ggml_backend_dev_t> devices; // null-terminated, alive until the model is loaded
    if (!rpc_endpoints.empty()) {
        devices = rpc_devices(rpc_endpoints);
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
                devices.push_back(dev);
            }
        }
        devices.push_back(nullptr);
        mparams.devices = devices.data();
    }
    model_.reset(llama_model_load_from_file(path.c_str(), mparams));
    if (!model_) {
        throw std::invalid_argument(path + ": llama.cpp could not load this model file");
    }
    vocab_ = llama_model_get_vocab(model_.get());
}

std::string Model::meta(const std::string & key) const {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model_.get(), key.c_str(), buf.data(), buf.size());
    if (n < 0) {
        return "";
    }
    if (static_cast<size_t>(n) >= buf.size()) {
        buf.resize(n + 1);
        n = llama_model_meta_val_str(model_.get(), key.c_str(), buf.data(), buf.size());
    }
    return std::string(buf.data(), n);
}

std::vector<llama_token> Model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX / 2)) {
        throw std::length_error("text too long to tokenize");
    }
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), text.size(), out.data(), out.size(), add_special, parse_special);
    if (n < 0) {
        if (n == INT32_MIN) {
            throw std::length_error("tokenization overflow");
        }
        out.resize(-n);
        n = llama_tokenize(vocab_, text.data(), text.size(), out.data(), out.size(), add_special, parse_special);
    }
    out.resize(std::max(n, 0));
    return out;
}

std::string Model::token_to_piece(llama_token token, bool special) const {
    if (token < 0 || token >= n_vocab()) {
        throw std::out_of_range("token " + std::to_string(token) + " is not in the vocabulary (0.." +
                                std::to_string(n_vocab() - 1) + ")");
    }
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, special);
    if (n < 0) {
        std::vector<char> big(-n);
        n = llama_token_to_piece(vocab_, token, big.data(), big.size(), 0, special);
        return std::string(big.data(), std::max(n, 0));
    }
    return std::string(buf, n);
}

std::string Model::detokenize(const std::vector<llama_token> & tokens, bool special) const {
    std::string out;
    for (llama_token t : tokens) {
        out += token_to_piece(t, special);
    }
    return out;
}

void Model::check_tokens(const std::vector<llama_token> & tokens) const {
    const int32_t n = n_vocab();
    for (llama_token t : tokens) {
        if (t < 0 || t >= n) {
            throw std::out_of_range("token " + std::to_string(t) + " is not in the vocabulary");
        }
    }
}

} // namespace caa

// One loaded GGUF model: weights, vocabulary and metadata, shared by every Session on it.
// Immutable after loading, so several contexts on several threads may use it at once.
#pragma once

#include <llama.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace caa {

struct ModelDeleter {
    void operator()(llama_model * m) const { llama_model_free(m); }
};
using ModelPtr = std::unique_ptr<llama_model, ModelDeleter>;

class Model {
  public:
    // n_gpu_layers < 0: offload every layer. rpc_endpoints ("host:port", may be empty): llama.cpp
    // RPC workers whose devices come first in the offload order, before local GPUs (as --rpc).
    // flash_attn: every context's flash attention (AUTO: llama.cpp chooses per device).
    Model(const std::string & path, int32_t n_gpu_layers, const std::vector<std::string> & rpc_endpoints = {},
          llama_flash_attn_type flash_attn = LLAMA_FLASH_ATTN_TYPE_AUTO);

    int32_t n_embd() const { return llama_model_n_embd(model_.get()); }
    int32_t n_layer() const { return llama_model_n_layer(model_.get()); }
    int32_t n_vocab() const { return llama_vocab_n_tokens(vocab_); }
    llama_model * get() const { return model_.get(); }
    // What every context on this model is made with.
    llama_flash_attn_type flash_attn() const { return flash_attn_; }
    const llama_vocab * vocab() const { return vocab_; }

    // Model metadata value for `key`, "" when absent.
    std::string meta(const std::string & key) const;
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string token_to_piece(llama_token token, bool special) const;
    std::string detokenize(const std::vector<llama_token> & tokens, bool special) const;
    bool is_eog(llama_token token) const { return llama_vocab_is_eog(vocab_, token); }
    // Throws std::out_of_range naming the first token outside the vocabulary.
    void check_tokens(const std::vector<llama_token> & tokens) const;

  private:
    ModelPtr model_;
    const llama_vocab * vocab_ = nullptr;
    llama_flash_attn_type flash_attn_ = LLAMA_FLASH_ATTN_TYPE_AUTO;
};

using SharedModel = std::shared_ptr<Model>;

} // namespace caa

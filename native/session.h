// caa-local native engine: a llama.cpp context on a shared Model, steered generation.
// Python owns files, templates and CLI; this owns llama.cpp state and every per-token loop.
#pragma once

#include "model.h"
#include "text.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace caa {

// Most sequences (KV streams) one llama.cpp context holds (its LLAMA_MAX_SEQ).
inline uint32_t max_sequences() { return static_cast<uint32_t>(llama_max_parallel_sequences()); }

struct ContextDeleter {
    void operator()(llama_context * c) const { llama_free(c); }
};
struct SamplerDeleter {
    void operator()(llama_sampler * s) const { llama_sampler_free(s); }
};
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// A persistent CPU threadpool, as llama.cpp's own CLI attaches to its context. Without one,
// ggml makes and joins a disposable pool for every graph, i.e. for every generated token.
class Threadpool {
  public:
    explicit Threadpool(int32_t n_threads); // no pool (nullptr) when the CPU backend has none
    ~Threadpool();
    Threadpool(const Threadpool &) = delete;
    Threadpool & operator=(const Threadpool &) = delete;
    ggml_threadpool_t get() const { return pool_; }

  private:
    ggml_threadpool_t pool_ = nullptr;
    void (*free_)(ggml_threadpool_t) = nullptr;
};

// A llama_batch freed on scope exit (exceptions included).
struct BatchPtr {
    llama_batch batch;
    explicit BatchPtr(int32_t n_tokens, int32_t n_seq_max = 1) : batch(llama_batch_init(n_tokens, 0, n_seq_max)) {}
    ~BatchPtr() { llama_batch_free(batch); }
    BatchPtr(const BatchPtr &) = delete;
    BatchPtr & operator=(const BatchPtr &) = delete;
};

// The block whose output `t` is (llama.cpp names those tensors l_out-N), or -1 for any other
// tensor: what every graph evaluation callback here looks for.
inline int block_output_of(const ggml_tensor * t) {
    const char * name = ggml_get_name(t);
    return std::strncmp(name, "l_out-", 6) == 0 ? std::atoi(name + 6) : -1;
}

// Appends one token of sequence `seq` at position `pos` to `batch`; `output`: llama.cpp keeps
// its logits (and the last block's output row).
inline void add_token(llama_batch & batch, llama_token token, llama_pos pos, llama_seq_id seq, bool output) {
    const int32_t k = batch.n_tokens++;
    batch.token[k]     = token;
    batch.pos[k]       = pos;
    batch.n_seq_id[k]  = 1;
    batch.seq_id[k][0] = seq;
    batch.logits[k]    = output;
}

// Raised when tokens do not fit in the context; Python drops old turns and retries.
struct ContextFullError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A composed steering buffer as llama_set_adapter_cvec takes it.
struct Steering {
    std::vector<float> data; // (n_layer - 1) x n_embd floats, from layer 1; empty = none
    int32_t il_start = -1;   // first steered layer, inclusive
    int32_t il_end   = -1;   // last steered layer, inclusive
    bool active() const { return !data.empty(); }
    // Content fingerprint: equal buffers get equal ids; 0 means no steering.
    uint64_t id() const;
};

struct SamplingParams {
    float    temperature    = 0.0f; // <= 0: greedy
    float    top_p          = 1.0f;
    int32_t  top_k          = 0;    // 0: off
    float    min_p          = 0.0f;
    float    repeat_penalty = 1.0f; // 1: off
    int32_t  repeat_last_n  = 64;
    uint32_t seed           = 0;
};

struct GenerateResult {
    std::vector<llama_token> tokens;
    std::string stop_reason; // "eog", "max_tokens", "context", or what on_token returned
};

// Runs after every sampled token with the UTF-8 text completed by it ("" while a character
// is still partial). Returns "" to go on, or the stop reason to end generation.
using TokenCallback = std::function<std::string(const std::string & piece)>;
// Polled between prefill batches: true stops decoding (the batches done stay cached).
using StopCheck = std::function<bool()>;

// Builds a llama.cpp context with the options caa-local uses everywhere.
ContextPtr make_context(const Model & model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq_max,
                        int32_t n_threads, ggml_backend_sched_eval_callback cb_eval = nullptr,
                        void * cb_user_data = nullptr);

// n_threads <= 0: every hardware thread the OS reports.
int32_t pick_threads(int32_t n_threads);

// Throws std::invalid_argument unless `steering` is empty or fits the model exactly.
void validate_steering(const Steering & steering, int32_t n_layer, int32_t n_embd);

// A sampler chain for `p` (greedy when temperature <= 0).
SamplerPtr make_sampler(const SamplingParams & p, int32_t n_vocab);

// log(sum(exp(logits[0..n)))), computed around the largest logit (log-softmax: logit - this).
double log_sum_exp(const float * logits, int32_t n);

// Applies `steering` (or clears it) on `ctx`; throws with llama.cpp's code on failure.
void apply_steering(llama_context * ctx, const Steering & steering, int32_t n_embd);

class Session {
  public:
    Session(SharedModel model, uint32_t n_ctx, int32_t n_threads, uint32_t n_batch);

    const Model & model() const { return *model_; }
    const SharedModel & shared_model() const { return model_; }
    uint32_t n_ctx() const { return llama_n_ctx(ctx_.get()); }
    int32_t n_threads() const { return n_threads_; }
    uint32_t n_batch() const { return n_batch_; }
    const llama_context * context() const { return ctx_.get(); }

    // Steering used for every token decoded with steered = true from now on.
    void set_steering(Steering steering);
    void clear_steering() { steering_ = Steering{}; steering_id_ = 0; }
    const Steering & steering() const { return steering_; }
    uint64_t steering_id() const { return steering_id_; }

    // Tokens whose keys/values are in the cache, in order (position i = tokens()[i]), and the
    // steering id each was decoded with (0: none).
    const std::vector<llama_token> & tokens() const { return tokens_; }
    const std::vector<uint64_t> & token_steering() const { return token_steering_; }
    // Length of the cached prefix that equals `tokens` and was decoded as they would be now:
    // positions < steer_from with no steering, the rest with the current steering.
    size_t reusable(const std::vector<llama_token> & tokens, size_t steer_from) const;
    // Drops cached tokens from position n_keep on.
    void truncate(size_t n_keep);
    // Decodes `tokens` after the cached ones; steered=false decodes them with no vector.
    // Returns false when `should_stop` ended it early (the batches done stay cached).
    bool decode(const std::vector<llama_token> & tokens, bool steered, const StopCheck & should_stop = nullptr);
    // Samples up to max_tokens tokens after the cached ones, decoding each steered.
    GenerateResult generate(int32_t max_tokens, const SamplingParams & params, const TokenCallback & on_token);

    // Output of every block (l_out-N, N = 0..n_layer-1) at the last token of `tokens`,
    // decoded in a fresh context: positions < steer_from unsteered, the rest with the
    // current steering. Returns n_layer x n_embd floats, block 0 first. For tests and checks.
    std::vector<float> layer_outputs(const std::vector<llama_token> & tokens, size_t steer_from) const;
    // Logits (n_vocab) after `tokens`, decoded as layer_outputs does.
    std::vector<float> logits_after(const std::vector<llama_token> & tokens, size_t steer_from) const;

    // Rebuilds the context with `cb_eval` (llama.cpp takes it only at creation), its user data
    // kept alive by `owner` as long as the context lives; the KV cache starts empty. For reading
    // block outputs while generating (native/condition.h).
    void set_eval_callback(ggml_backend_sched_eval_callback cb_eval, std::shared_ptr<void> owner);

  private:
    void use_steering(bool steered);
    // A fresh context that has decoded `tokens`: positions < steer_from unsteered, the rest steered.
    ContextPtr decode_fresh(const std::vector<llama_token> & tokens, size_t steer_from,
                            ggml_backend_sched_eval_callback cb_eval, void * cb_user_data,
                            int32_t & last_index) const;

    SharedModel model_;
    int32_t n_threads_;
    std::unique_ptr<Threadpool> threadpool_; // declared before ctx_: freed after it
    std::shared_ptr<void> eval_owner_;       // the eval callback's user data: freed after ctx_
    ContextPtr ctx_;
    uint32_t n_batch_;
    Steering steering_;
    uint64_t steering_id_ = 0;
    bool applied_ = false;         // whether ctx_'s vector is known
    bool applied_steered_ = false; // and whether it is steering_ (else none)
    std::vector<llama_token> tokens_;
    std::vector<uint64_t> token_steering_;
    BatchPtr one_token_{1}; // reused by generate: one decode per token
};

} // namespace caa

#include "session.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <algorithm>
#include <cstring>
#include <thread>

namespace caa {

namespace {

int32_t pick_threads(int32_t n_threads) {
    if (n_threads > 0) {
        return n_threads;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 4 : static_cast<int32_t>(std::min(hw, 8u));
}

void silent_log(ggml_log_level level, const char * text, void * /*user*/) {
    if (level == GGML_LOG_LEVEL_ERROR && std::getenv("CAA_LOCAL_LLAMA_LOG") != nullptr) {
        std::fputs(text, stderr);
    } else if (std::getenv("CAA_LOCAL_LLAMA_LOG") != nullptr && std::strcmp(std::getenv("CAA_LOCAL_LLAMA_LOG"), "all") == 0) {
        std::fputs(text, stderr);
    }
}

// Captures the last row of every l_out-N tensor while a context decodes.
struct LayerProbe {
    int32_t n_embd = 0;
    std::vector<float> out; // n_layer x n_embd
};

bool probe_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * probe = static_cast<LayerProbe *>(user_data);
    const char * name = ggml_get_name(t);
    if (std::strncmp(name, "l_out-", 6) != 0) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    const int il = std::atoi(name + 6);
    if (t->type != GGML_TYPE_F32 || t->ne[0] != probe->n_embd || il < 0 ||
        static_cast<size_t>(il + 1) * probe->n_embd > probe->out.size()) {
        return true;
    }
    const int64_t n_rows = ggml_nrows(t);
    const size_t row_bytes = probe->n_embd * sizeof(float);
    ggml_backend_tensor_get(t, probe->out.data() + static_cast<size_t>(il) * probe->n_embd,
                            static_cast<size_t>(n_rows - 1) * t->nb[1], row_bytes);
    return true;
}

} // namespace

ContextPtr make_context(llama_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq_max,
                        int32_t n_threads, ggml_backend_sched_eval_callback cb_eval, void * cb_user_data) {
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = n_ctx;
    cparams.n_batch         = n_batch;
    cparams.n_ubatch        = n_batch;
    cparams.n_seq_max       = n_seq_max;
    cparams.n_threads       = n_threads;
    cparams.n_threads_batch = n_threads;
    cparams.no_perf         = true;
    // One KV stream per sequence. (With a unified cache, llama.cpp 0.3.36 gave every sequence
    // after the first wrong attention when several prompts shared a context: measured.)
    cparams.kv_unified      = false;
    cparams.cb_eval           = cb_eval;
    cparams.cb_eval_user_data = cb_user_data;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        throw std::runtime_error("llama.cpp could not create a context of " + std::to_string(n_ctx) +
                                 " tokens (out of memory?)");
    }
    return ContextPtr(ctx);
}

void apply_steering(llama_context * ctx, const Steering & steering, int32_t n_embd) {
    const int32_t rc = steering.active()
                           ? llama_set_adapter_cvec(ctx, steering.data.data(), steering.data.size(), n_embd,
                                                    steering.il_start, steering.il_end)
                           : llama_set_adapter_cvec(ctx, nullptr, 0, n_embd, -1, -1);
    if (rc != 0) {
        throw std::runtime_error("llama_set_adapter_cvec failed with code " + std::to_string(rc));
    }
}

Session::Session(const std::string & model_path, uint32_t n_ctx, int32_t n_threads, int32_t n_gpu_layers,
                 uint32_t n_batch)
    : n_threads_(pick_threads(n_threads)), n_batch_(n_batch == 0 ? 512 : n_batch) {
    static const bool backend_ready = [] {
        llama_log_set(silent_log, nullptr);
        llama_backend_init();
        return true;
    }();
    (void) backend_ready;
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = n_gpu_layers;
    model_.reset(llama_model_load_from_file(model_path.c_str(), mparams));
    if (!model_) {
        throw std::invalid_argument(model_path + ": llama.cpp could not load this model file");
    }
    vocab_ = llama_model_get_vocab(model_.get());
    ctx_ = make_context(model_.get(), n_ctx, std::min(n_batch_, n_ctx), 1, n_threads_);
    n_batch_ = llama_n_batch(ctx_.get()); // what llama.cpp accepts per llama_decode call
}

std::string Session::meta(const std::string & key) const {
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

std::string Session::description() const {
    char buf[256];
    const int32_t n = llama_model_desc(model_.get(), buf, sizeof(buf));
    return n > 0 ? std::string(buf, std::min<size_t>(n, sizeof(buf) - 1)) : "";
}

std::vector<llama_token> Session::tokenize(const std::string & text, bool add_special, bool parse_special) const {
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

std::string Session::token_to_piece(llama_token token, bool special) const {
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

std::string Session::detokenize(const std::vector<llama_token> & tokens, bool special) const {
    std::string out;
    for (llama_token t : tokens) {
        out += token_to_piece(t, special);
    }
    return out;
}

void validate_steering(const Steering & steering, int32_t n_layer, int32_t n_embd) {
    if (!steering.active()) {
        return;
    }
    const size_t expected = static_cast<size_t>(n_layer - 1) * n_embd;
    if (steering.data.size() != expected) {
        // llama.cpp keeps old values past a short buffer: never hand it one.
        throw std::invalid_argument("steering buffer has " + std::to_string(steering.data.size()) +
                                    " floats, expected (n_layer - 1) x n_embd = " + std::to_string(expected));
    }
    if (steering.il_start < 1 || steering.il_end >= n_layer || steering.il_start > steering.il_end) {
        throw std::invalid_argument("steering layer range " + std::to_string(steering.il_start) + ".." +
                                    std::to_string(steering.il_end) + " is outside 1.." + std::to_string(n_layer - 1));
    }
}

void Session::set_steering(Steering steering) {
    validate_steering(steering, n_layer(), n_embd());
    steering_ = std::move(steering);
    applied_ = false;
}

void Session::use_steering(bool steered) {
    // One llama_set_adapter_cvec call per change: each makes the scheduler re-reserve its graph.
    static const Steering none;
    const bool want = steered && steering_.active();
    if (applied_ && want == applied_steered_) {
        return;
    }
    apply_steering(ctx_.get(), want ? steering_ : none, n_embd());
    applied_ = true;
    applied_steered_ = want;
}

void Session::truncate(size_t n_keep) {
    if (n_keep >= tokens_.size()) {
        return;
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx_.get()), 0, static_cast<llama_pos>(n_keep), -1)) {
        llama_memory_clear(llama_get_memory(ctx_.get()), true);
        tokens_.clear();
        return;
    }
    tokens_.resize(n_keep);
}

void Session::decode(const std::vector<llama_token> & tokens, bool steered, const std::function<void()> & check_interrupt) {
    if (tokens.empty()) {
        return;
    }
    if (tokens_.size() + tokens.size() > n_ctx()) {
        throw ContextFullError("context full: " + std::to_string(tokens_.size()) + " cached + " +
                               std::to_string(tokens.size()) + " new tokens > n_ctx " + std::to_string(n_ctx()));
    }
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab()) {
            throw std::out_of_range("token " + std::to_string(t) + " is not in the vocabulary");
        }
    }
    use_steering(steered);
    const uint32_t step = n_batch_;
    BatchPtr holder(static_cast<int32_t>(step));
    llama_batch & batch = holder.batch;
    for (size_t start = 0; start < tokens.size(); start += step) {
        if (check_interrupt) {
            check_interrupt();
        }
        const size_t end = std::min(tokens.size(), start + step);
        batch.n_tokens = 0;
        for (size_t i = start; i < end; ++i) {
            const int32_t k = batch.n_tokens++;
            batch.token[k]     = tokens[i];
            batch.pos[k]       = static_cast<llama_pos>(tokens_.size() + (i - start));
            batch.n_seq_id[k]  = 1;
            batch.seq_id[k][0] = 0;
            batch.logits[k]    = (i + 1 == tokens.size());
        }
        const int32_t rc = llama_decode(ctx_.get(), batch);
        if (rc != 0) {
            throw std::runtime_error("llama_decode failed with code " + std::to_string(rc));
        }
        tokens_.insert(tokens_.end(), tokens.begin() + start, tokens.begin() + end);
    }
}

namespace {

SamplerPtr make_sampler(const SamplingParams & p, int32_t n_vocab) {
    auto chain_params = llama_sampler_chain_default_params();
    chain_params.no_perf = true;
    SamplerPtr chain(llama_sampler_chain_init(chain_params));
    if (p.repeat_penalty != 1.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty, 0.0f, 0.0f));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
        return chain;
    }
    if (p.top_k > 0) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(p.top_k));
    }
    if (p.top_p < 1.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(p.top_p, 1));
    }
    if (p.min_p > 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(p.min_p, 1));
    }
    llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(p.seed));
    return chain;
}

// Length of the longest prefix of `s` that is complete UTF-8 (a token may end mid-character).
size_t utf8_complete_prefix(const std::string & s) {
    size_t i = s.size();
    size_t back = 0;
    while (i > 0 && back < 4) {
        const unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {
            size_t need = (c & 0x80) == 0 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
            return back + 1 >= need ? s.size() : i - 1;
        }
        --i;
        ++back;
    }
    return s.size();
}

} // namespace

GenerateResult Session::generate(int32_t max_tokens, const SamplingParams & params, const PieceCallback & on_piece) {
    if (tokens_.empty()) {
        throw std::invalid_argument("generate needs a decoded prompt first");
    }
    GenerateResult result;
    SamplerPtr sampler = make_sampler(params, n_vocab());
    // Prime repetition penalties with the recent context.
    const size_t tail = std::min<size_t>(tokens_.size(), std::max(params.repeat_last_n, 0));
    for (size_t i = tokens_.size() - tail; i < tokens_.size(); ++i) {
        llama_sampler_accept(sampler.get(), tokens_[i]);
    }
    std::string pending;
    result.stop_reason = "max_tokens";
    for (int32_t n = 0; n < max_tokens; ++n) {
        const llama_token token = llama_sampler_sample(sampler.get(), ctx_.get(), -1);
        if (is_eog(token)) {
            result.stop_reason = "eog";
            break;
        }
        result.tokens.push_back(token);
        pending += token_to_piece(token, false);
        const size_t ready = utf8_complete_prefix(pending);
        if (ready > 0 && on_piece) {
            const bool go_on = on_piece(pending.substr(0, ready));
            pending.erase(0, ready);
            if (!go_on) {
                result.stop_reason = "callback";
                decode({token}, true);
                break;
            }
        }
        if (tokens_.size() + 1 > n_ctx()) {
            result.stop_reason = "context";
            break;
        }
        decode({token}, true);
    }
    if (!pending.empty() && on_piece) {
        on_piece(pending);
    }
    return result;
}

ContextPtr Session::decode_fresh(const std::vector<llama_token> & tokens, size_t steer_from,
                                 ggml_backend_sched_eval_callback cb_eval, void * cb_user_data,
                                 int32_t & last_index) const {
    if (tokens.empty() || steer_from > tokens.size()) {
        throw std::invalid_argument("need tokens and steer_from <= their count, got " +
                                    std::to_string(tokens.size()) + " tokens, steer_from " + std::to_string(steer_from));
    }
    const uint32_t n = static_cast<uint32_t>(tokens.size());
    ContextPtr ctx = make_context(model_.get(), n + 8, n, 1, n_threads_, cb_eval, cb_user_data);
    BatchPtr holder(static_cast<int32_t>(n));
    static const Steering none;
    const size_t bounds[3] = {0, steer_from, tokens.size()};
    for (int part = 0; part < 2; ++part) {
        if (bounds[part] >= bounds[part + 1]) {
            continue;
        }
        apply_steering(ctx.get(), part == 0 ? none : steering_, n_embd());
        llama_batch & batch = holder.batch;
        batch.n_tokens = 0;
        for (size_t i = bounds[part]; i < bounds[part + 1]; ++i) {
            const int32_t k = batch.n_tokens++;
            batch.token[k] = tokens[i];
            batch.pos[k] = static_cast<llama_pos>(i);
            batch.n_seq_id[k] = 1;
            batch.seq_id[k][0] = 0;
            batch.logits[k] = (i + 1 == bounds[part + 1]);
        }
        const int32_t rc = llama_decode(ctx.get(), batch);
        if (rc != 0) {
            throw std::runtime_error("llama_decode failed with code " + std::to_string(rc));
        }
        last_index = batch.n_tokens - 1;
    }
    return ctx;
}

std::vector<float> Session::layer_outputs(const std::vector<llama_token> & tokens, size_t steer_from) const {
    LayerProbe probe;
    probe.n_embd = n_embd();
    probe.out.assign(static_cast<size_t>(n_layer()) * n_embd(), 0.0f);
    int32_t last_index = -1;
    decode_fresh(tokens, steer_from, probe_callback, &probe, last_index);
    return probe.out;
}

std::vector<float> Session::logits_after(const std::vector<llama_token> & tokens, size_t steer_from) const {
    int32_t last_index = -1;
    ContextPtr ctx = decode_fresh(tokens, steer_from, nullptr, nullptr, last_index);
    const float * logits = llama_get_logits_ith(ctx.get(), last_index);
    return std::vector<float>(logits, logits + n_vocab());
}

} // namespace caa

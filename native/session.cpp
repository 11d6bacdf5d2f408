#include "session.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace caa {

namespace {

// Captures the last row of every l_out-N tensor while a context decodes.
struct LayerProbe {
    int32_t n_embd = 0;
    std::vector<float> out; // n_layer x n_embd
};

bool probe_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * probe = static_cast<LayerProbe *>(user_data);
    const int il = block_output_of(t);
    if (il < 0) {
        return !ask;
    }
    if (ask) {
        return true;
    }
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

int32_t pick_threads(int32_t n_threads) {
    if (n_threads > 0) {
        return n_threads;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 4 : static_cast<int32_t>(hw);
}

Threadpool::Threadpool(int32_t n_threads) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) {
        return;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
    auto * make = reinterpret_cast<ggml_threadpool_t (*)(ggml_threadpool_params *)>(
        ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new"));
    free_ = reinterpret_cast<void (*)(ggml_threadpool_t)>(ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free"));
    if (make == nullptr || free_ == nullptr) {
        return;
    }
    ggml_threadpool_params params = ggml_threadpool_params_default(n_threads); // polling as llama.cpp's CLI
    pool_ = make(&params);
}

Threadpool::~Threadpool() {
    if (pool_ != nullptr) {
        free_(pool_);
    }
}

uint64_t Steering::id() const {
    if (!active()) {
        return 0;
    }
    // FNV-1a over the range and the raw floats.
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](const void * p, size_t n) {
        const auto * b = static_cast<const unsigned char *>(p);
        for (size_t i = 0; i < n; ++i) {
            h = (h ^ b[i]) * 1099511628211ull;
        }
    };
    mix(&il_start, sizeof(il_start));
    mix(&il_end, sizeof(il_end));
    mix(data.data(), data.size() * sizeof(float));
    return h == 0 ? 1 : h;
}

ContextPtr make_context(const Model & model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq_max,
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
    cparams.flash_attn_type = model.flash_attn();
    cparams.cb_eval           = cb_eval;
    cparams.cb_eval_user_data = cb_user_data;
    llama_context * ctx = llama_init_from_model(model.get(), cparams);
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

Session::Session(SharedModel model, uint32_t n_ctx, int32_t n_threads, uint32_t n_batch)
    : model_(std::move(model)), n_threads_(pick_threads(n_threads)), n_batch_(n_batch == 0 ? 512 : n_batch) {
    if (!model_) {
        throw std::invalid_argument("a Session needs a loaded model");
    }
    threadpool_ = std::make_unique<Threadpool>(n_threads_);
    ctx_ = make_context(*model_, n_ctx, std::min(n_batch_, n_ctx), 1, n_threads_);
    if (threadpool_->get() != nullptr) {
        llama_attach_threadpool(ctx_.get(), threadpool_->get(), nullptr);
    }
    n_batch_ = llama_n_batch(ctx_.get()); // what llama.cpp accepts per llama_decode call
}

void Session::set_eval_callback(ggml_backend_sched_eval_callback cb_eval, std::shared_ptr<void> owner) {
    const uint32_t n_ctx = llama_n_ctx(ctx_.get());
    ctx_.reset();
    tokens_.clear();
    token_steering_.clear();
    applied_ = false;
    eval_owner_ = std::move(owner);
    ctx_ = make_context(*model_, n_ctx, n_batch_, 1, n_threads_, cb_eval, eval_owner_.get());
    if (threadpool_->get() != nullptr) {
        llama_attach_threadpool(ctx_.get(), threadpool_->get(), nullptr);
    }
}

void Session::set_steering(Steering steering) {
    validate_steering(steering, model_->n_layer(), model_->n_embd());
    steering_ = std::move(steering);
    steering_id_ = steering_.id();
    applied_ = false;
}

void Session::use_steering(bool steered) {
    // One llama_set_adapter_cvec call per change: each makes the scheduler re-reserve its graph.
    static const Steering none;
    const bool want = steered && steering_.active();
    if (applied_ && want == applied_steered_) {
        return;
    }
    apply_steering(ctx_.get(), want ? steering_ : none, model_->n_embd());
    applied_ = true;
    applied_steered_ = want;
}

size_t Session::reusable(const std::vector<llama_token> & tokens, size_t steer_from) const {
    const size_t n = std::min(tokens.size(), tokens_.size());
    size_t i = 0;
    for (; i < n; ++i) {
        const uint64_t wanted = i < steer_from ? 0 : steering_id_;
        if (tokens_[i] != tokens[i] || token_steering_[i] != wanted) {
            break;
        }
    }
    return i;
}

void Session::truncate(size_t n_keep) {
    if (n_keep >= tokens_.size()) {
        return;
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx_.get()), 0, static_cast<llama_pos>(n_keep), -1)) {
        // A partial removal is refused by some caches: start over rather than keep stale entries.
        llama_memory_clear(llama_get_memory(ctx_.get()), true);
        n_keep = 0;
    }
    tokens_.resize(n_keep);
    token_steering_.resize(n_keep);
}

bool Session::decode(const std::vector<llama_token> & tokens, bool steered, const StopCheck & should_stop) {
    if (tokens.empty()) {
        return true;
    }
    if (tokens_.size() + tokens.size() > n_ctx()) {
        throw ContextFullError("context full: " + std::to_string(tokens_.size()) + " cached + " +
                               std::to_string(tokens.size()) + " new tokens > n_ctx " + std::to_string(n_ctx()));
    }
    model_->check_tokens(tokens);
    use_steering(steered);
    const uint64_t id = steered ? steering_id_ : 0;
    const uint32_t step = n_batch_;
    BatchPtr holder(static_cast<int32_t>(std::min<size_t>(step, tokens.size())));
    llama_batch & batch = holder.batch;
    for (size_t start = 0; start < tokens.size(); start += step) {
        if (should_stop && should_stop()) {
            return false;
        }
        const size_t end = std::min(tokens.size(), start + step);
        batch.n_tokens = 0;
        for (size_t i = start; i < end; ++i) {
            add_token(batch, tokens[i], static_cast<llama_pos>(tokens_.size() + (i - start)), 0, i + 1 == tokens.size());
        }
        const int32_t rc = llama_decode(ctx_.get(), batch);
        if (rc != 0) {
            throw std::runtime_error("llama_decode failed with code " + std::to_string(rc));
        }
        tokens_.insert(tokens_.end(), tokens.begin() + start, tokens.begin() + end);
        token_steering_.insert(token_steering_.end(), end - start, id);
    }
    return true;
}

double log_sum_exp(const float * logits, int32_t n) {
    const float top = *std::max_element(logits, logits + n);
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        sum += std::exp(static_cast<double>(logits[i] - top));
    }
    return static_cast<double>(top) + std::log(sum);
}

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

GenerateResult Session::generate(int32_t max_tokens, const SamplingParams & params, const TokenCallback & on_token) {
    if (tokens_.empty()) {
        throw std::invalid_argument("generate needs a decoded prompt first");
    }
    GenerateResult result;
    SamplerPtr sampler = make_sampler(params, model_->n_vocab());
    // Prime repetition penalties with the recent context.
    const size_t tail = std::min<size_t>(tokens_.size(), std::max(params.repeat_last_n, 0));
    for (size_t i = tokens_.size() - tail; i < tokens_.size(); ++i) {
        llama_sampler_accept(sampler.get(), tokens_[i]);
    }
    use_steering(true);
    const uint64_t id = steering_id_;
    llama_batch & batch = one_token_.batch;
    auto decode_one = [&](llama_token token) {
        batch.n_tokens = 0;
        add_token(batch, token, static_cast<llama_pos>(tokens_.size()), 0, true);
        const int32_t rc = llama_decode(ctx_.get(), batch);
        if (rc != 0) {
            throw std::runtime_error("llama_decode failed with code " + std::to_string(rc));
        }
        tokens_.push_back(token);
        token_steering_.push_back(id);
    };
    std::string pending;
    result.stop_reason = "max_tokens";
    for (int32_t n = 0; n < max_tokens; ++n) {
        const llama_token token = llama_sampler_sample(sampler.get(), ctx_.get(), -1);
        if (model_->is_eog(token)) {
            result.stop_reason = "eog";
            break;
        }
        result.tokens.push_back(token);
        pending += model_->token_to_piece(token, false);
        const size_t ready = utf8_complete_prefix(pending);
        std::string stop;
        if (on_token) {
            stop = on_token(pending.substr(0, ready));
        }
        pending.erase(0, ready);
        if (!stop.empty()) {
            result.stop_reason = stop;
            decode_one(token); // the cache holds every token the answer holds
            break;
        }
        if (tokens_.size() + 1 > n_ctx()) {
            result.stop_reason = "context";
            break;
        }
        decode_one(token);
    }
    if (!pending.empty() && on_token) {
        on_token(pending);
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
    model_->check_tokens(tokens);
    const uint32_t n = static_cast<uint32_t>(tokens.size());
    ContextPtr ctx = make_context(*model_, n + 8, n, 1, n_threads_, cb_eval, cb_user_data);
    BatchPtr holder(static_cast<int32_t>(n));
    static const Steering none;
    const size_t bounds[3] = {0, steer_from, tokens.size()};
    for (int part = 0; part < 2; ++part) {
        if (bounds[part] >= bounds[part + 1]) {
            continue;
        }
        apply_steering(ctx.get(), part == 0 ? none : steering_, model_->n_embd());
        llama_batch & batch = holder.batch;
        batch.n_tokens = 0;
        for (size_t i = bounds[part]; i < bounds[part + 1]; ++i) {
            add_token(batch, tokens[i], static_cast<llama_pos>(i), 0, i + 1 == bounds[part + 1]);
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
    probe.n_embd = model_->n_embd();
    probe.out.assign(static_cast<size_t>(model_->n_layer()) * model_->n_embd(), 0.0f);
    int32_t last_index = -1;
    decode_fresh(tokens, steer_from, probe_callback, &probe, last_index);
    return probe.out;
}

std::vector<float> Session::logits_after(const std::vector<llama_token> & tokens, size_t steer_from) const {
    int32_t last_index = -1;
    ContextPtr ctx = decode_fresh(tokens, steer_from, nullptr, nullptr, last_index);
    const float * logits = llama_get_logits_ith(ctx.get(), last_index);
    return std::vector<float>(logits, logits + model_->n_vocab());
}

} // namespace caa

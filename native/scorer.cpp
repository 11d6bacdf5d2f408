#include "scorer.h"

#include <algorithm>
#include <numeric>

namespace caa {

Scorer::Scorer(const Session & session, const std::vector<std::vector<llama_token>> & prefixes, int32_t n_options,
               int32_t max_tail)
    : model_(session.shared_model()), n_options_(n_options), max_tail_(max_tail),
      n_batch_(std::max<uint32_t>(session.n_batch(), static_cast<uint32_t>(std::max(max_tail, 1)))) {
    if (prefixes.empty() || n_options < 1 || max_tail < 1) {
        throw std::invalid_argument("scorer needs questions, n_options >= 1 and max_tail >= 1");
    }
    if (prefixes.size() > max_sequences()) {
        throw std::invalid_argument(std::to_string(prefixes.size()) + " questions exceed llama.cpp's " +
                                    std::to_string(max_sequences()) + " sequences");
    }
    size_t longest = 0;
    for (const auto & p : prefixes) {
        model_->check_tokens(p);
        longest = std::max(longest, p.size());
        prefix_len_.push_back(static_cast<llama_pos>(p.size()));
    }
    // One KV stream per question, each long enough for its prefix and one continuation.
    const size_t per_seq = (longest + max_tail + 1 + 255) / 256 * 256;
    ctx_ = make_context(*model_, static_cast<uint32_t>(per_seq * prefixes.size()), n_batch_,
                        static_cast<uint32_t>(prefixes.size()), session.n_threads());
    apply_steering(ctx_.get(), Steering{}, model_->n_embd());
    decode_prefixes(prefixes);
}

void Scorer::decode(llama_batch & batch, std::vector<Pending> & pending, std::vector<double> & result) {
    if (batch.n_tokens == 0) {
        return;
    }
    const int32_t rc = llama_decode(ctx_.get(), batch);
    if (rc != 0) {
        throw std::runtime_error("llama_decode failed while scoring, code " + std::to_string(rc));
    }
    const int32_t n_vocab = model_->n_vocab();
    // Pending entries come in row order; options that share a row share its normalizer.
    for (size_t i = 0; i < pending.size();) {
        const int32_t row = pending[i].row;
        const float * logits = llama_get_logits_ith(ctx_.get(), row);
        const double lse = log_sum_exp(logits, n_vocab);
        for (; i < pending.size() && pending[i].row == row; ++i) {
            result[pending[i].out] += static_cast<double>(logits[pending[i].next]) - lse;
        }
    }
    pending.clear();
    batch.n_tokens = 0;
}

void Scorer::decode_prefixes(const std::vector<std::vector<llama_token>> & prefixes) {
    BatchPtr holder(static_cast<int32_t>(n_batch_));
    llama_batch & batch = holder.batch;
    std::vector<Pending> none;
    std::vector<double> unused;
    for (size_t q = 0; q < prefixes.size(); ++q) {
        for (size_t i = 0; i < prefixes[q].size(); ++i) {
            if (batch.n_tokens == static_cast<int32_t>(n_batch_)) {
                decode(batch, none, unused);
            }
            add_token(batch, prefixes[q][i], static_cast<llama_pos>(i), static_cast<llama_seq_id>(q), false);
        }
        decode(batch, none, unused); // see score_option(): one sequence length per llama_decode call
    }
}

void Scorer::check_request(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored) const {
    const size_t n_q = prefix_len_.size();
    if (continuations.size() != n_q || n_scored.size() != n_q) {
        throw std::invalid_argument("expected continuations for " + std::to_string(n_q) + " questions, got " +
                                    std::to_string(continuations.size()));
    }
    for (size_t q = 0; q < n_q; ++q) {
        if (continuations[q].size() != static_cast<size_t>(n_options_) || n_scored[q].size() != continuations[q].size()) {
            throw std::invalid_argument("question " + std::to_string(q) + ": expected " + std::to_string(n_options_) +
                                        " continuations");
        }
        for (int32_t o = 0; o < n_options_; ++o) {
            const auto & c = continuations[q][o];
            const int32_t s = n_scored[q][o];
            if (c.size() > static_cast<size_t>(max_tail_) || s < 1 || static_cast<size_t>(s) >= c.size()) {
                throw std::invalid_argument("question " + std::to_string(q) + " option " + std::to_string(o) + ": " +
                                            std::to_string(c.size()) + " tokens (max " + std::to_string(max_tail_) +
                                            "), " + std::to_string(s) + " scored (need 1..tokens-1)");
            }
            model_->check_tokens(c);
        }
    }
}

void Scorer::score_option(int32_t o, const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                          std::vector<double> & result) {
    // llama.cpp 0.3.36 computes wrong attention when one llama_decode call holds sequences of
    // different lengths (measured: every sequence but the first drifts). So each call holds
    // continuations of one length only (see also score_shared()).
    const size_t n_q = prefix_len_.size();
    std::vector<size_t> order(n_q);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return continuations[a][o].size() < continuations[b][o].size();
    });
    BatchPtr holder(static_cast<int32_t>(n_batch_));
    llama_batch & batch = holder.batch;
    std::vector<Pending> pending;
    size_t prev_len = 0;
    for (size_t q : order) {
        const auto & c = continuations[q][o];
        if (c.size() != prev_len || batch.n_tokens + c.size() > n_batch_) {
            decode(batch, pending, result);
            prev_len = c.size();
        }
        const size_t first_scored = c.size() - n_scored[q][o];
        // The last token is only scored, never an input.
        for (size_t i = 0; i + 1 < c.size(); ++i) {
            const bool wants = i + 1 >= first_scored;
            if (wants) {
                pending.push_back({batch.n_tokens, q * n_options_ + o, c[i + 1]});
            }
            add_token(batch, c[i], prefix_len_[q] + static_cast<llama_pos>(i), static_cast<llama_seq_id>(q), wants);
        }
    }
    decode(batch, pending, result);
}

bool Scorer::inputs_shared(const Continuations & continuations) const {
    for (const auto & options : continuations) {
        const auto & first = options[0];
        for (const auto & c : options) {
            if (c.size() != first.size() || !std::equal(c.begin(), c.end() - 1, first.begin())) {
                return false;
            }
        }
    }
    return true;
}

void Scorer::score_shared(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                          std::vector<double> & result) {
    // Every option of a question has the same input tokens (its continuation but the last token,
    // which is only scored): they are decoded once, and each output row scores every option's
    // next token. One llama_decode call holds tails of one length only (see score_option()).
    const size_t n_q = prefix_len_.size();
    std::vector<size_t> order(n_q);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return continuations[a][0].size() < continuations[b][0].size();
    });
    BatchPtr holder(static_cast<int32_t>(n_batch_));
    llama_batch & batch = holder.batch;
    std::vector<Pending> pending;
    size_t prev_len = 0;
    for (size_t q : order) {
        const auto & inputs = continuations[q][0];
        const size_t n_inputs = inputs.size() - 1;
        if (n_inputs != prev_len || batch.n_tokens + n_inputs > n_batch_) {
            decode(batch, pending, result);
            prev_len = n_inputs;
        }
        for (size_t i = 0; i < n_inputs; ++i) {
            bool wants = false;
            for (int32_t o = 0; o < n_options_; ++o) {
                if (i + 1 >= inputs.size() - n_scored[q][o]) {
                    pending.push_back({batch.n_tokens, q * n_options_ + o, continuations[q][o][i + 1]});
                    wants = true;
                }
            }
            add_token(batch, inputs[i], prefix_len_[q] + static_cast<llama_pos>(i), static_cast<llama_seq_id>(q), wants);
        }
    }
    decode(batch, pending, result);
}

void Scorer::drop_continuations() {
    llama_memory_t mem = llama_get_memory(ctx_.get());
    for (size_t q = 0; q < prefix_len_.size(); ++q) {
        if (!llama_memory_seq_rm(mem, static_cast<llama_seq_id>(q), prefix_len_[q], -1)) {
            // The next option would attend to this one's tokens: never score on such a cache.
            throw std::runtime_error("llama.cpp could not drop question " + std::to_string(q) +
                                     "'s scored tokens from its KV cache");
        }
    }
}

std::vector<double> Scorer::score(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                                  const Steering & steering) {
    check_request(continuations, n_scored);
    validate_steering(steering, model_->n_layer(), model_->n_embd());
    apply_steering(ctx_.get(), steering, model_->n_embd());
    std::vector<double> result(prefix_len_.size() * n_options_, 0.0);
    if (inputs_shared(continuations)) {
        score_shared(continuations, n_scored, result);
        drop_continuations();
        return result;
    }
    // Options go one after another: each question's sequence holds one continuation at a time.
    for (int32_t o = 0; o < n_options_; ++o) {
        score_option(o, continuations, n_scored, result);
        drop_continuations();
    }
    return result;
}

} // namespace caa

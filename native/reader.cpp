#include "reader.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>

namespace caa {

namespace {

bool read_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * probe = static_cast<ReadProbe *>(user_data);
    const char * name = ggml_get_name(t);
    if (std::strncmp(name, "l_out-", 6) != 0) {
        return ask ? false : true;
    }
    const int il = std::atoi(name + 6);
    const int32_t slot = il >= 0 && static_cast<size_t>(il) < probe->layer_slot.size() ? probe->layer_slot[il] : -1;
    if (ask) {
        return slot >= 0 && probe->picks != nullptr && !probe->picks->empty();
    }
    if (slot < 0 || probe->picks == nullptr || !probe->error.empty()) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != probe->n_embd || t->nb[0] != sizeof(float)) {
        probe->error = std::string(name) + ": expected contiguous F32 rows of " + std::to_string(probe->n_embd);
        return true;
    }
    // Block outputs hold a row per token, except where llama.cpp keeps only the output rows
    // (the last block, when not every token is an output).
    const int64_t n_rows = ggml_nrows(t);
    const bool by_output = n_rows != probe->n_tokens;
    if (by_output && n_rows != probe->n_outputs) {
        probe->error = std::string(name) + " has " + std::to_string(n_rows) + " rows, expected " +
                       std::to_string(probe->n_tokens) + " tokens or " + std::to_string(probe->n_outputs) + " outputs";
        return true;
    }
    const size_t row_bytes = static_cast<size_t>(probe->n_embd) * sizeof(float);
    probe->row.resize(probe->n_embd);
    for (const ReadPick & p : *probe->picks) {
        const int32_t r = by_output ? p.output : p.row;
        if (r < 0 || r >= n_rows) {
            probe->error = std::string(name) + ": row " + std::to_string(r) + " is not in this batch";
            return true;
        }
        ggml_backend_tensor_get(t, probe->row.data(), static_cast<size_t>(r) * t->nb[1], row_bytes);
        float * dst = probe->out + p.dst + static_cast<size_t>(slot) * probe->n_embd;
        for (int32_t j = 0; j < probe->n_embd; ++j) {
            dst[j] += p.weight * probe->row[j];
        }
    }
    return true;
}

void add_token(llama_batch & batch, llama_token token, llama_pos pos, llama_seq_id seq, bool output) {
    const int32_t k = batch.n_tokens++;
    batch.token[k] = token;
    batch.pos[k] = pos;
    batch.n_seq_id[k] = 1;
    batch.seq_id[k][0] = seq;
    batch.logits[k] = output;
}

} // namespace

Reader::Reader(const Session & session, std::vector<llama_token> prefix, std::vector<int32_t> layers,
               int32_t max_pairs, int32_t max_len)
    : model_(session.shared_model()), prefix_(std::move(prefix)), layers_(std::move(layers)), max_pairs_(max_pairs),
      max_len_(max_len), n_batch_(std::max<uint32_t>(session.n_batch(), 64)) {
    const int32_t n_layer = model_->n_layer();
    if (layers_.empty() || max_pairs < 1 || max_len < 2) {
        throw std::invalid_argument("reader needs layers, max_pairs >= 1 and max_len >= 2");
    }
    if (static_cast<uint32_t>(max_pairs) + 1 > kMaxSequences) {
        throw std::invalid_argument(std::to_string(max_pairs) + " pairs exceed llama.cpp's " +
                                    std::to_string(kMaxSequences - 1) + " sequences beside the prefix");
    }
    if (prefix_.size() >= static_cast<size_t>(max_len)) {
        throw std::invalid_argument("prefix of " + std::to_string(prefix_.size()) + " tokens leaves no room in " +
                                    std::to_string(max_len));
    }
    probe_.layer_slot.assign(n_layer, -1);
    for (size_t i = 0; i < layers_.size(); ++i) {
        const int32_t il = layers_[i];
        if (il < 0 || il >= n_layer) {
            throw std::invalid_argument("layer " + std::to_string(il) + " is not a block of this model (0.." +
                                        std::to_string(n_layer - 1) + ")");
        }
        if (probe_.layer_slot[il] >= 0) {
            throw std::invalid_argument("layer " + std::to_string(il) + " is listed twice");
        }
        probe_.layer_slot[il] = static_cast<int32_t>(i);
    }
    outputs_needed_ = probe_.layer_slot[n_layer - 1] >= 0;
    probe_.n_embd = model_->n_embd();
    model_->check_tokens(prefix_);
    // One KV stream per pair plus one for the prefix (the last sequence id).
    const uint32_t n_seq = static_cast<uint32_t>(max_pairs) + 1;
    const size_t per_seq = (static_cast<size_t>(max_len) + 1 + 255) / 256 * 256;
    ctx_ = make_context(*model_, static_cast<uint32_t>(per_seq * n_seq), n_batch_, n_seq, session.n_threads(),
                        read_callback, &probe_);
    apply_steering(ctx_.get(), Steering{}, model_->n_embd());
    BatchPtr holder(static_cast<int32_t>(n_batch_));
    static const std::vector<ReadPick> none;
    for (size_t i = 0; i < prefix_.size();) {
        holder.batch.n_tokens = 0;
        for (; i < prefix_.size() && holder.batch.n_tokens < static_cast<int32_t>(n_batch_); ++i) {
            add_token(holder.batch, prefix_[i], static_cast<llama_pos>(i), max_pairs_, false);
        }
        decode(holder.batch, none, nullptr);
    }
}

void Reader::decode(llama_batch & batch, const std::vector<ReadPick> & picks, float * out) {
    if (batch.n_tokens == 0) {
        return;
    }
    probe_.picks = &picks;
    probe_.out = out;
    probe_.n_tokens = batch.n_tokens;
    probe_.n_outputs = 0;
    for (int32_t k = 0; k < batch.n_tokens; ++k) {
        probe_.n_outputs += batch.logits[k] ? 1 : 0;
    }
    probe_.error.clear();
    const int32_t rc = llama_decode(ctx_.get(), batch);
    probe_.picks = nullptr;
    batch.n_tokens = 0;
    if (rc != 0) {
        throw std::runtime_error("llama_decode failed while reading block outputs, code " + std::to_string(rc));
    }
    if (!probe_.error.empty()) {
        throw std::runtime_error("reading block outputs: " + probe_.error);
    }
}

std::vector<float> Reader::read(const std::vector<std::vector<llama_token>> & seqs, const std::vector<int32_t> & shared,
                                const std::vector<int32_t> & n_read, const std::function<void()> & check_interrupt) {
    const size_t n_pairs = shared.size();
    if (seqs.size() != 2 * n_pairs || n_read.size() != 2 * n_pairs) {
        throw std::invalid_argument("expected 2 sequences and 2 read spans per pair, got " + std::to_string(seqs.size()) +
                                    " and " + std::to_string(n_read.size()) + " for " + std::to_string(n_pairs) + " pairs");
    }
    const size_t g = prefix_.size();
    for (size_t p = 0; p < n_pairs; ++p) {
        const auto & a = seqs[2 * p];
        const auto & b = seqs[2 * p + 1];
        const size_t s = static_cast<size_t>(std::max(shared[p], 0));
        const std::string where = "pair " + std::to_string(p) + ": ";
        if (a.size() > static_cast<size_t>(max_len_) || b.size() > static_cast<size_t>(max_len_)) {
            throw std::invalid_argument(where + "sequences of " + std::to_string(a.size()) + " and " +
                                        std::to_string(b.size()) + " tokens exceed " + std::to_string(max_len_));
        }
        if (s < g || s >= a.size() || s >= b.size() || !std::equal(a.begin(), a.begin() + s, b.begin()) ||
            !std::equal(prefix_.begin(), prefix_.end(), a.begin())) {
            throw std::invalid_argument(where + "shared length " + std::to_string(shared[p]) +
                                        " must cover the common prefix and leave each sequence a token of its own");
        }
        for (int k = 0; k < 2; ++k) {
            const auto & seq = seqs[2 * p + k];
            if (n_read[2 * p + k] < 1 || static_cast<size_t>(n_read[2 * p + k]) > seq.size() - g) {
                throw std::invalid_argument(where + "read span " + std::to_string(n_read[2 * p + k]) + " outside 1.." +
                                            std::to_string(seq.size() - g));
            }
            model_->check_tokens(seq);
        }
    }

    const size_t n_layers = layers_.size();
    const size_t n_embd = static_cast<size_t>(model_->n_embd());
    std::vector<float> out(n_pairs * 2 * n_layers * n_embd, 0.0f);
    llama_memory_t mem = llama_get_memory(ctx_.get());
    BatchPtr holder(static_cast<int32_t>(n_batch_));
    llama_batch & batch = holder.batch;
    std::vector<ReadPick> picks;
    const llama_seq_id prefix_seq = max_pairs_;
    int32_t n_out = 0; // output tokens in the batch so far
    auto flush = [&] {
        if (check_interrupt) {
            check_interrupt();
        }
        decode(batch, picks, out.data());
        picks.clear();
        n_out = 0;
    };
    // Adds token i of sequence 2p+k to the batch in stream `seq`; `both`: the token is in the
    // part the pair shares, so a read there counts for both of its sequences.
    auto add = [&](size_t p, int k, size_t i, llama_seq_id seq, bool both) {
        bool wanted = false;
        for (int kk = both ? 0 : k; kk <= (both ? 1 : k); ++kk) {
            const auto & s = seqs[2 * p + kk];
            const size_t first = s.size() - static_cast<size_t>(n_read[2 * p + kk]);
            if (i >= first) {
                const size_t dst = (p * 2 + kk) * n_layers * n_embd;
                picks.push_back({batch.n_tokens, -1, dst, 1.0f / static_cast<float>(n_read[2 * p + kk])});
                wanted = true;
            }
        }
        if (wanted && outputs_needed_) {
            for (auto it = picks.rbegin(); it != picks.rend() && it->row == batch.n_tokens; ++it) {
                it->output = n_out;
            }
            ++n_out;
        }
        add_token(batch, seqs[2 * p + k][i], static_cast<llama_pos>(i), seq, wanted && outputs_needed_);
    };

    for (size_t start = 0; start < n_pairs; start += static_cast<size_t>(max_pairs_)) {
        const size_t n = std::min(n_pairs - start, static_cast<size_t>(max_pairs_));
        // Streams in order of the answers' lengths, so equal lengths sit in consecutive
        // sequence ids: llama.cpp then decodes them as one ubatch, in batch order. (It gets
        // attention wrong when one call mixes sequences with different token counts.)
        std::vector<size_t> order(n);
        std::iota(order.begin(), order.end(), start);
        auto tail = [&](size_t p, int k) { return seqs[2 * p + k].size() - static_cast<size_t>(shared[p]); };
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
            return std::make_pair(tail(x, 0), tail(x, 1)) < std::make_pair(tail(y, 0), tail(y, 1));
        });
        // Each pair's stream: the prefix's KV (copied), then its shared part, decoded once.
        for (size_t slot = 0; slot < n; ++slot) {
            const size_t p = order[slot];
            const llama_seq_id seq = static_cast<llama_seq_id>(slot);
            llama_memory_seq_rm(mem, seq, -1, -1);
            if (g > 0) {
                llama_memory_seq_cp(mem, prefix_seq, seq, -1, -1);
            }
            for (size_t i = g; i < static_cast<size_t>(shared[p]); ++i) {
                if (batch.n_tokens == static_cast<int32_t>(n_batch_)) {
                    flush();
                }
                add(p, 0, i, seq, true);
            }
            flush();
        }
        // Then the answers, matching ones first: runs of consecutive streams with equal
        // answer lengths go through one llama_decode.
        for (int k = 0; k < 2; ++k) {
            size_t run_len = 0;
            for (size_t slot = 0; slot < n; ++slot) {
                const size_t p = order[slot];
                const size_t len = tail(p, k);
                if (len != run_len || batch.n_tokens + len > n_batch_) {
                    flush();
                    run_len = len;
                }
                if (len > n_batch_) {
                    throw std::invalid_argument("answer of " + std::to_string(len) + " tokens exceeds the batch of " +
                                                std::to_string(n_batch_));
                }
                for (size_t i = static_cast<size_t>(shared[p]); i < seqs[2 * p + k].size(); ++i) {
                    add(p, k, i, static_cast<llama_seq_id>(slot), false);
                }
            }
            flush();
            for (size_t slot = 0; slot < n; ++slot) {
                llama_memory_seq_rm(mem, static_cast<llama_seq_id>(slot), shared[order[slot]], -1);
            }
        }
    }
    return out;
}

} // namespace caa

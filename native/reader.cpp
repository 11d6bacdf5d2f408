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
    const int il = block_output_of(t);
    if (il < 0) {
        return !ask;
    }
    const int32_t slot = il >= 0 && static_cast<size_t>(il) < probe->layer_slot.size() ? probe->layer_slot[il] : -1;
    if (ask) {
        return slot >= 0 && probe->picks != nullptr && !probe->picks->empty();
    }
    if (slot < 0 || probe->picks == nullptr || !probe->error.empty()) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != probe->n_embd || t->nb[0] != sizeof(float)) {
        probe->error = std::string(ggml_get_name(t)) + ": expected contiguous F32 rows of " + std::to_string(probe->n_embd);
        return true;
    }
    // Block outputs hold a row per token, except where llama.cpp keeps only the output rows
    // (the last block, when not every token is an output).
    const int64_t n_rows = ggml_nrows(t);
    const bool by_output = n_rows != probe->n_tokens;
    if (by_output && n_rows != probe->n_outputs) {
        probe->error = std::string(ggml_get_name(t)) + " has " + std::to_string(n_rows) + " rows, expected " +
                       std::to_string(probe->n_tokens) + " tokens or " + std::to_string(probe->n_outputs) + " outputs";
        return true;
    }
    const size_t row_bytes = static_cast<size_t>(probe->n_embd) * sizeof(float);
    probe->row.resize(probe->n_embd);
    for (const ReadPick & p : *probe->picks) {
        const int32_t r = by_output ? p.output : p.row;
        if (r < 0 || r >= n_rows) {
            probe->error = std::string(ggml_get_name(t)) + ": row " + std::to_string(r) + " is not in this batch";
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

} // namespace

Reader::Reader(const Session & session, std::vector<llama_token> prefix, std::vector<int32_t> layers,
               int32_t max_pairs, int32_t max_len)
    : model_(session.shared_model()), prefix_(std::move(prefix)), layers_(std::move(layers)), max_pairs_(max_pairs),
      max_len_(max_len), n_batch_(std::max<uint32_t>(session.n_batch(), 64)) {
    const int32_t n_layer = model_->n_layer();
    if (layers_.empty() || max_pairs < 1 || max_len < 2) {
        throw std::invalid_argument("reader needs layers, max_pairs >= 1 and max_len >= 2");
    }
    if (static_cast<uint32_t>(max_pairs) + 1 > max_sequences()) {
        throw std::invalid_argument(std::to_string(max_pairs) + " pairs exceed llama.cpp's " +
                                    std::to_string(max_sequences() - 1) + " sequences beside the prefix");
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

void Reader::check_request(const Request & r) const {
    const size_t n_pairs = r.shared.size();
    if (r.seqs.size() != 2 * n_pairs || r.n_read.size() != 2 * n_pairs) {
        throw std::invalid_argument("expected 2 sequences and 2 read spans per pair, got " + std::to_string(r.seqs.size()) +
                                    " and " + std::to_string(r.n_read.size()) + " for " + std::to_string(n_pairs) + " pairs");
    }
    const size_t g = prefix_.size();
    for (size_t p = 0; p < n_pairs; ++p) {
        const auto & a = r.seqs[2 * p];
        const auto & b = r.seqs[2 * p + 1];
        const size_t s = static_cast<size_t>(std::max(r.shared[p], 0));
        const std::string where = "pair " + std::to_string(p) + ": ";
        if (a.size() > static_cast<size_t>(max_len_) || b.size() > static_cast<size_t>(max_len_)) {
            throw std::invalid_argument(where + "sequences of " + std::to_string(a.size()) + " and " +
                                        std::to_string(b.size()) + " tokens exceed " + std::to_string(max_len_));
        }
        if (s < g || s >= a.size() || s >= b.size() || !std::equal(a.begin(), a.begin() + s, b.begin()) ||
            !std::equal(prefix_.begin(), prefix_.end(), a.begin())) {
            throw std::invalid_argument(where + "shared length " + std::to_string(r.shared[p]) +
                                        " must cover the common prefix and leave each sequence a token of its own");
        }
        for (int k = 0; k < 2; ++k) {
            const auto & seq = r.seqs[2 * p + k];
            if (r.n_read[2 * p + k] < 1 || static_cast<size_t>(r.n_read[2 * p + k]) > seq.size() - g) {
                throw std::invalid_argument(where + "read span " + std::to_string(r.n_read[2 * p + k]) + " outside 1.." +
                                            std::to_string(seq.size() - g));
            }
            model_->check_tokens(seq);
        }
    }
}

void Reader::flush(const Request & r, Fill & fill) {
    if (r.check_interrupt) {
        r.check_interrupt();
    }
    decode(fill.holder.batch, fill.picks, r.out);
    fill.picks.clear();
    fill.n_out = 0;
}

void Reader::add(const Request & r, Fill & fill, size_t p, int k, size_t i, llama_seq_id seq, bool both) {
    llama_batch & batch = fill.holder.batch;
    const size_t n_layers = layers_.size();
    const size_t n_embd = static_cast<size_t>(probe_.n_embd);
    bool wanted = false;
    for (int kk = both ? 0 : k; kk <= (both ? 1 : k); ++kk) {
        const auto & s = r.seqs[2 * p + kk];
        const size_t first = s.size() - static_cast<size_t>(r.n_read[2 * p + kk]);
        if (i >= first) {
            const size_t dst = (p * 2 + kk) * n_layers * n_embd;
            fill.picks.push_back({batch.n_tokens, -1, dst, 1.0f / static_cast<float>(r.n_read[2 * p + kk])});
            wanted = true;
        }
    }
    if (wanted && outputs_needed_) {
        for (auto it = fill.picks.rbegin(); it != fill.picks.rend() && it->row == batch.n_tokens; ++it) {
            it->output = fill.n_out;
        }
        ++fill.n_out;
    }
    add_token(batch, r.seqs[2 * p + k][i], static_cast<llama_pos>(i), seq, wanted && outputs_needed_);
}

std::vector<size_t> Reader::stream_order(const Request & r, size_t start, size_t n) const {
    // Streams in order of the answers' lengths, so equal lengths sit in consecutive sequence
    // ids: llama.cpp then decodes them as one ubatch, in batch order. (It gets attention wrong
    // when one call mixes sequences with different token counts.)
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), start);
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
        return std::make_pair(r.tail(x, 0), r.tail(x, 1)) < std::make_pair(r.tail(y, 0), r.tail(y, 1));
    });
    return order;
}

void Reader::decode_shared(const Request & r, const std::vector<size_t> & order, Fill & fill) {
    llama_memory_t mem = llama_get_memory(ctx_.get());
    const llama_seq_id prefix_seq = max_pairs_;
    for (size_t slot = 0; slot < order.size(); ++slot) {
        const size_t p = order[slot];
        const llama_seq_id seq = static_cast<llama_seq_id>(slot);
        if (!llama_memory_seq_rm(mem, seq, -1, -1)) {
            throw std::runtime_error("llama.cpp could not clear KV stream " + std::to_string(seq));
        }
        if (!prefix_.empty()) {
            llama_memory_seq_cp(mem, prefix_seq, seq, -1, -1);
        }
        for (size_t i = prefix_.size(); i < static_cast<size_t>(r.shared[p]); ++i) {
            if (fill.holder.batch.n_tokens == static_cast<int32_t>(n_batch_)) {
                flush(r, fill);
            }
            add(r, fill, p, 0, i, seq, true);
        }
        flush(r, fill); // one sequence per llama_decode call
    }
}

void Reader::decode_answers(const Request & r, const std::vector<size_t> & order, int k, Fill & fill) {
    size_t run_len = 0;
    for (size_t slot = 0; slot < order.size(); ++slot) {
        const size_t p = order[slot];
        const size_t len = r.tail(p, k);
        if (len != run_len || fill.holder.batch.n_tokens + len > n_batch_) {
            flush(r, fill);
            run_len = len;
        }
        if (len > n_batch_) {
            throw std::invalid_argument("answer of " + std::to_string(len) + " tokens exceeds the batch of " +
                                        std::to_string(n_batch_));
        }
        for (size_t i = static_cast<size_t>(r.shared[p]); i < r.seqs[2 * p + k].size(); ++i) {
            add(r, fill, p, k, i, static_cast<llama_seq_id>(slot), false);
        }
    }
    flush(r, fill);
    // Back to the shared part, for the other answer.
    llama_memory_t mem = llama_get_memory(ctx_.get());
    for (size_t slot = 0; slot < order.size(); ++slot) {
        if (!llama_memory_seq_rm(mem, static_cast<llama_seq_id>(slot), r.shared[order[slot]], -1)) {
            throw std::runtime_error("llama.cpp could not drop an answer from KV stream " + std::to_string(slot));
        }
    }
}

std::vector<float> Reader::read(const std::vector<std::vector<llama_token>> & seqs, const std::vector<int32_t> & shared,
                                const std::vector<int32_t> & n_read, const std::function<void()> & check_interrupt) {
    const size_t n_pairs = shared.size();
    std::vector<float> out(seqs.size() * layers_.size() * static_cast<size_t>(probe_.n_embd), 0.0f);
    const Request r{seqs, shared, n_read, check_interrupt, out.data()};
    check_request(r);
    Fill fill(static_cast<int32_t>(n_batch_));
    for (size_t start = 0; start < n_pairs; start += static_cast<size_t>(max_pairs_)) {
        const std::vector<size_t> order = stream_order(r, start, std::min(n_pairs - start, static_cast<size_t>(max_pairs_)));
        // Each pair's stream: the prefix's KV (copied), then its shared part, decoded once;
        // then the answers, matching ones first.
        decode_shared(r, order, fill);
        decode_answers(r, order, 0, fill);
        decode_answers(r, order, 1, fill);
    }
    return out;
}

} // namespace caa

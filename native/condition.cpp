#include "condition.h"

#include <ggml-backend.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace caa {

RowProbe::RowProbe(const Model & model, const std::vector<int32_t> & layers)
    : layers_(layers), layer_slot_(static_cast<size_t>(model.n_layer()), -1), n_embd_(model.n_embd()) {
    if (layers_.empty()) {
        throw std::invalid_argument("a row probe needs at least one layer");
    }
    const int32_t n_layer = model.n_layer();
    for (size_t i = 0; i < layers_.size(); ++i) {
        const int32_t il = layers_[i];
        // The last block keeps only the rows of output tokens, so its rows cannot be mapped
        // back to positions.
        if (il < 0 || il > n_layer - 2) {
            throw std::invalid_argument("layer " + std::to_string(il) + " cannot be watched (valid: 0.." +
                                        std::to_string(n_layer - 2) + ")");
        }
        if (layer_slot_[il] >= 0) {
            throw std::invalid_argument("layer " + std::to_string(il) + " is listed twice");
        }
        layer_slot_[il] = static_cast<int32_t>(i);
    }
    seen_.assign(layers_.size(), 0);
    counts_.assign(layers_.size(), 0);
    sums_.assign(layers_.size() * static_cast<size_t>(n_embd_), 0.0);
    row_.resize(static_cast<size_t>(n_embd_));
}

std::shared_ptr<RowProbe> RowProbe::attach(Session & session, const std::vector<int32_t> & layers) {
    auto probe = std::make_shared<RowProbe>(session.model(), layers);
    session.set_eval_callback(&RowProbe::callback, probe);
    return probe;
}

void RowProbe::arm(int64_t begin, int64_t end) {
    if (begin < 0 || end <= begin) {
        throw std::invalid_argument("row span " + std::to_string(begin) + ".." + std::to_string(end) +
                                    " is empty or negative");
    }
    begin_ = begin;
    end_ = end;
    std::fill(seen_.begin(), seen_.end(), 0);
    std::fill(counts_.begin(), counts_.end(), 0);
    std::fill(sums_.begin(), sums_.end(), 0.0);
    error_.clear();
    armed_ = true;
}

int64_t RowProbe::count() const {
    return *std::min_element(counts_.begin(), counts_.end());
}

std::vector<float> RowProbe::means() const {
    if (!error_.empty()) {
        throw std::runtime_error("reading block outputs: " + error_);
    }
    std::vector<float> out(sums_.size());
    for (size_t s = 0; s < layers_.size(); ++s) {
        if (counts_[s] == 0) {
            throw std::runtime_error("no row of block " + std::to_string(layers_[s]) + " was read");
        }
        for (int32_t j = 0; j < n_embd_; ++j) {
            const size_t k = s * static_cast<size_t>(n_embd_) + static_cast<size_t>(j);
            out[k] = static_cast<float>(sums_[k] / static_cast<double>(counts_[s]));
        }
    }
    return out;
}

bool RowProbe::observe(ggml_tensor * t, int32_t slot) {
    if (t->type != GGML_TYPE_F32 || t->ne[0] != n_embd_ || t->nb[0] != sizeof(float)) {
        error_ = std::string(ggml_get_name(t)) + ": expected contiguous F32 rows of " + std::to_string(n_embd_);
        return true;
    }
    // Each llama_decode call of a Session is one ubatch: this tensor holds one row per token
    // of it, in batch order, so rows count on from the previous call.
    const int64_t n_rows = ggml_nrows(t);
    const int64_t first = seen_[slot];
    seen_[slot] += n_rows;
    const int64_t lo = std::max(begin_, first);
    const int64_t hi = std::min(end_, first + n_rows);
    const size_t row_bytes = static_cast<size_t>(n_embd_) * sizeof(float);
    double * dst = sums_.data() + static_cast<size_t>(slot) * static_cast<size_t>(n_embd_);
    for (int64_t r = lo; r < hi; ++r) {
        ggml_backend_tensor_get(t, row_.data(), static_cast<size_t>(r - first) * t->nb[1], row_bytes);
        for (int32_t j = 0; j < n_embd_; ++j) {
            dst[j] += row_[j];
        }
        ++counts_[slot];
    }
    return true;
}

bool RowProbe::callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * probe = static_cast<RowProbe *>(user_data);
    if (!probe->armed_) {
        return !ask; // ask: not needed, so the graph runs unsplit; otherwise go on
    }
    const int il = block_output_of(t);
    if (il < 0) {
        return !ask;
    }
    const int32_t slot = il >= 0 && static_cast<size_t>(il) < probe->layer_slot_.size() ? probe->layer_slot_[il] : -1;
    if (ask) {
        return slot >= 0;
    }
    if (slot < 0 || !probe->error_.empty()) {
        return true;
    }
    return probe->observe(t, slot);
}

} // namespace caa

#include "row_steer.h"

#include <ggml-backend.h>
#include <ggml.h>

namespace caa {

// Adds each row's direction to the l_out-N tensors of the blocks some row steers.
bool row_steer_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * p = static_cast<RowSteer *>(user_data);
    const int il = block_output_of(t);
    if (il < 0) {
        return !ask;
    }
    const bool on = il >= 1 && static_cast<size_t>(il) < p->layer_on.size() && p->layer_on[il];
    if (ask) {
        return on;
    }
    if (!on || !p->error.empty()) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != p->n_embd || t->nb[0] != sizeof(float)) {
        p->error = std::string(ggml_get_name(t)) + ": expected contiguous F32 rows of " + std::to_string(p->n_embd);
        return true;
    }
    // llama.cpp splits a batch whose sequence ids have gaps into one ubatch per run of
    // consecutive ids, in batch order, and computes a graph for each: this tensor holds the rows
    // of the current ubatch, which start where the earlier ubatches' rows at this block ended.
    // The last block keeps only the output rows when not every token is an output (then the
    // batch is one sequence's prompt: one ubatch).
    const int64_t n_rows = ggml_nrows(t);
    const int64_t n_batch_rows = static_cast<int64_t>(p->rows.size());
    const int64_t first = p->consumed[il];
    p->consumed[il] += n_rows;
    const bool by_output = first == 0 && n_rows != n_batch_rows && n_rows == p->n_outputs;
    if (!by_output && first + n_rows > n_batch_rows) {
        p->error = std::string(ggml_get_name(t)) + " has " + std::to_string(n_rows) + " rows after " +
                   std::to_string(first) + ", expected " + std::to_string(n_batch_rows) + " tokens or " +
                   std::to_string(p->n_outputs) + " outputs";
        return true;
    }
    ggml_backend_buffer_t buf = t->view_src != nullptr ? t->view_src->buffer : t->buffer;
    if (buf == nullptr) {
        p->error = std::string(ggml_get_name(t)) + ": tensor has no backend buffer";
        return true;
    }
    // Host memory (CPU) is changed in place; elsewhere (a GPU) a row goes there and back.
    const bool host = ggml_backend_buffer_is_host(buf);
    const size_t row_bytes = static_cast<size_t>(p->n_embd) * sizeof(float);
    const int64_t begin = by_output ? 0 : first;
    const int64_t end = by_output ? n_batch_rows : first + n_rows;
    for (int64_t r = begin; r < end; ++r) {
        const Steering * s = p->rows[r];
        if (s == nullptr || il < s->il_start || il > s->il_end) {
            continue;
        }
        const int64_t row = by_output ? p->row_output[r] : r - first;
        if (row < 0) {
            continue; // not an output: llama.cpp drops its last-block row, as it drops the vector's
        }
        const float * dir = s->data.data() + static_cast<size_t>(il - 1) * p->n_embd;
        float * dst;
        if (host) {
            dst = reinterpret_cast<float *>(static_cast<char *>(t->data) + row * t->nb[1]);
        } else {
            p->buffer.resize(p->n_embd);
            ggml_backend_tensor_get(t, p->buffer.data(), static_cast<size_t>(row) * t->nb[1], row_bytes);
            dst = p->buffer.data();
        }
        for (int32_t j = 0; j < p->n_embd; ++j) {
            dst[j] += dir[j]; // the same float add llama.cpp's control vector makes
        }
        if (!host) {
            ggml_backend_tensor_set(t, dst, static_cast<size_t>(row) * t->nb[1], row_bytes);
        }
        ++p->rows_added;
    }
    return true;
}

} // namespace caa

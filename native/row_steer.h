// Per-row steering inside one llama_decode: the graph evaluation callback adds each batch row's
// own direction at the outputs (l_out-N) of the blocks it steers, so that sequences with
// different steerings share a decode (llama.cpp's control vector belongs to a whole context).
#pragma once

#include "session.h"

#include <string>
#include <vector>

namespace caa {

// State the evaluation callback sees while one llama_decode runs in per-row mode.
struct RowSteer {
    int32_t n_embd = 0;
    std::vector<char> layer_on;               // block il -> some row adds a direction there
    std::vector<const Steering *> rows;       // per batch row: its steering (nullptr: none)
    std::vector<int32_t> row_output;          // per batch row: its index among the outputs, or -1
    int32_t n_outputs = 0;
    std::vector<int64_t> consumed;            // block il -> batch rows its earlier ubatches held
    std::vector<float> buffer;                // one row, for tensors outside host memory
    int64_t rows_added = 0;                   // row additions made (for tests: never a silent no-op)
    std::string error;                        // set by the callback; checked after llama_decode
};

// llama.cpp's cb_eval: `user_data` is the RowSteer of the decode in progress.
bool row_steer_callback(ggml_tensor * t, bool ask, void * user_data);

} // namespace caa

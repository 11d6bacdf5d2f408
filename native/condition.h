// Conditional steering (CAST, design.md §5d): the block outputs (l_out-N) of one span of the
// prompt, averaged over its tokens, read while a Session decodes that prompt unsteered.
// The Session's context carries row_probe_callback only once a probe is attached
// (RowProbe::attach), so contexts that never check a condition pay nothing.
#pragma once

#include "session.h"

#include <ggml.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace caa {

class RowProbe {
  public:
    // Watches blocks `layers` (0..n_layer-2: the last block keeps only output rows) of
    // `session`, whose context is rebuilt with the probe's callback (its KV cache is dropped).
    static std::shared_ptr<RowProbe> attach(Session & session, const std::vector<int32_t> & layers);

    explicit RowProbe(const Model & model, const std::vector<int32_t> & layers);

    // Reads rows begin..end-1 (exclusive end) of the tokens decoded from now on, counted from
    // the first of them, until disarm(). Clears earlier reads.
    void arm(int64_t begin, int64_t end);
    void disarm() { armed_ = false; }
    // Rows read so far (the same for every watched block once a decode call has finished).
    int64_t count() const;
    // Mean of the rows read, per watched block in `layers` order: n_layers x n_embd floats.
    // Throws if the callback met a tensor it could not read, or no row was read.
    std::vector<float> means() const;

    const std::vector<int32_t> & layers() const { return layers_; }
    int32_t n_embd() const { return n_embd_; }

    // The eval callback (ggml_backend_sched_eval_callback); user_data is the RowProbe.
    static bool callback(ggml_tensor * t, bool ask, void * user_data);

  private:
    bool observe(ggml_tensor * t, int32_t slot);

    std::vector<int32_t> layers_;
    std::vector<int32_t> layer_slot_; // block il -> index in layers_, or -1
    int32_t n_embd_;
    bool armed_ = false;
    int64_t begin_ = 0;
    int64_t end_ = 0;
    std::vector<int64_t> seen_;   // per watched block: rows seen since arm()
    std::vector<int64_t> counts_; // per watched block: rows added
    std::vector<double> sums_;    // n_layers x n_embd
    std::vector<float> row_;
    std::string error_;
};

} // namespace caa

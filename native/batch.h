// Many conversations in one llama.cpp context: continuous batching with per-sequence steering.
// Every live sequence's next token goes through one llama_decode per step; a finished sequence
// leaves and a waiting one joins (its prompt prefilled with the paper's position mask) between
// steps. A llama_decode whose rows all want the same steering (or none) uses llama.cpp's
// control-vector API; one that mixes steerings adds each row's direction itself at the outputs
// of the steered blocks (the l_out-N tensors, in the graph evaluation callback).
#pragma once

#include "row_steer.h"
#include "session.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace caa {

// One conversation to answer.
struct BatchRequest {
    std::vector<llama_token> tokens; // the rendered prompt
    size_t steer_from = 0;           // positions before it are decoded unsteered
    Steering steering;               // empty: none
    SamplingParams sampling;
    int32_t max_tokens = 256;
    std::vector<std::string> stops;  // stop strings: the answer ends before the first one met
    bool record_logits = false;      // keep the logits of every sampled position (checks, tests)
    // >= 1: score instead of answering: the log-probability of tokens[score_from..] given the
    // tokens before (under `steering`), from the prefill alone; the KV stays cached for reuse.
    int64_t score_from = -1;
};

// What one step produced for one request.
struct BatchEvent {
    int64_t id = 0;
    std::string piece;       // answer text completed in this step ("" while a character is partial)
    bool done = false;
    // When done:
    std::string stop_reason; // eog, max_tokens, context, stop (a stop string), cancelled
    std::vector<llama_token> tokens; // every sampled token of the answer (eog excluded)
    int32_t n_prompt = 0;
    int32_t n_reused = 0;    // prompt tokens whose KV was reused from the sequence's cache
    double prompt_seconds = 0.0;
    double decode_seconds = 0.0;
    std::vector<float> logits; // n_vocab per sampled position, when the request recorded them
    double logprob = 0.0;      // a scoring request's sum of log-probabilities ...
    int32_t n_scored = 0;      // ... over this many tokens
};

class Batch {
  public:
    // n_seq sequences (one KV stream each) of at most n_ctx_seq tokens, on `model`.
    Batch(SharedModel model, uint32_t n_seq, uint32_t n_ctx_seq, int32_t n_threads, uint32_t n_batch);
    ~Batch();
    Batch(const Batch &) = delete;
    Batch & operator=(const Batch &) = delete;

    // Queue a request (any thread); it joins at the next step with a free sequence. Returns its id.
    int64_t submit(BatchRequest request);
    // Ask a queued or running request to stop (any thread): it ends at the next step, "cancelled".
    void cancel(int64_t id);
    // One step: admit waiting requests into free sequences (prefill), then decode every live
    // sequence's next token in one llama_decode and sample the next. Returns the events.
    std::vector<BatchEvent> step();
    // Runs steps until every request given is done; results in request order, each with its
    // whole answer text in `piece`. `check_interrupt` runs between steps and may throw (the
    // run's requests are then dropped).
    std::vector<BatchEvent> run(std::vector<BatchRequest> requests, const std::function<void()> & check_interrupt);

    size_t n_live() const;
    size_t n_waiting() const;
    uint32_t n_seq() const { return n_seq_; }
    uint32_t n_ctx_seq() const { return n_ctx_seq_; }
    int32_t n_threads() const { return n_threads_; }
    const Model & model() const { return *model_; }
    // Always add directions per row, even where every row shares one steering (for checks).
    void set_force_rows(bool on) { force_rows_ = on; }
    bool force_rows() const { return force_rows_; }
    // Keep the log-probability of each token an unsteered request sampled: a later scoring
    // request over the same tokens reads it instead of decoding them again.
    void set_keep_logprobs(bool on) { keep_logprobs_ = on; }
    bool keep_logprobs() const { return keep_logprobs_; }
    int64_t scored_from_cache() const { return scored_from_cache_; }
    // Prompt prefixes a request took from another sequence's cache (share_prefix()).
    int64_t prefixes_shared() const { return prefixes_shared_; }
    // Counters: llama_decode calls made per mode, and row additions made by the callback.
    int64_t decodes_cvec() const { return decodes_cvec_; }
    int64_t decodes_rows() const { return decodes_rows_; }
    int64_t rows_added() const { return probe_.rows_added; }

  private:
    using Clock = std::chrono::steady_clock;
    struct Live; // a running request, bound to a sequence

    struct Next {                            // what an unsteered decode said of the token after a position
        llama_token token = -1;              // -1: nothing known
        double logprob = 0.0;
    };
    struct Sequence {
        std::vector<llama_token> tokens;     // in its KV stream, in order
        std::vector<uint64_t> steering_ids;  // per cached position: steering id it was decoded with
        std::vector<Next> next;              // per cached position (kept with keep_logprobs)
        std::unique_ptr<Live> live;          // the request it runs, or none (free)
    };
    // Adds the log-probability of each token after an output row of the last decode to `live`.
    void add_logprobs(Live & live, size_t first_pos, int32_t n_rows, int32_t first_row);

    uint32_t free_sequence(const BatchRequest & r, uint64_t steering_id, const std::vector<char> & written) const;
    void admit(std::vector<BatchEvent> & events);
    void prefill(uint32_t seq, std::vector<BatchEvent> & events);
    void decode_step(std::vector<BatchEvent> & events);
    // Samples after batch row `idx`, and handles the token: true while the sequence goes on.
    bool sample(uint32_t seq, int32_t idx, std::vector<BatchEvent> & events);
    void finish(uint32_t seq, const std::string & reason, std::vector<BatchEvent> & events);
    // llama_decode of `batch`, whose row r is steered by rows[r] (nullptr: none).
    // ids[r]: rows[r]'s steering id (0: none).
    void decode(llama_batch & batch, const std::vector<const Steering *> & rows, const std::vector<uint64_t> & ids);
    std::vector<BatchEvent> run_ids(const std::vector<int64_t> & ids, const std::function<void()> & check_interrupt);
    // Forgets the listed requests, waiting or running, with no event.
    void drop(const std::vector<int64_t> & ids);
    size_t reusable(const Sequence & s, const BatchRequest & r, uint64_t steering_id) const;
    // The prefix `seq`'s request can keep: its own cache's (`own`), or a longer one copied from
    // another sequence's cache. Returns the tokens now reusable.
    size_t share_prefix(uint32_t seq, size_t own);

    SharedModel model_;
    uint32_t n_seq_;
    int32_t n_threads_;
    uint32_t n_batch_;
    uint32_t n_ctx_seq_ = 0;
    bool force_rows_ = false;
    bool keep_logprobs_ = false;
    int64_t scored_from_cache_ = 0;
    int64_t prefixes_shared_ = 0;
    RowSteer probe_;
    std::unique_ptr<Threadpool> threadpool_; // declared before ctx_: freed after it
    ContextPtr ctx_;
    uint64_t applied_cvec_ = 0; // steering id set through llama_set_adapter_cvec (0: none)
    bool cvec_known_ = false;
    std::vector<Sequence> seqs_;
    std::unique_ptr<BatchPtr> batch_;
    int64_t decodes_cvec_ = 0;
    int64_t decodes_rows_ = 0;
    std::atomic<size_t> n_live_{0}; // read from other threads (a server's event loop)

    mutable std::mutex mutex_; // guards the fields below (submit/cancel come from other threads)
    std::deque<std::pair<int64_t, BatchRequest>> waiting_;
    std::vector<int64_t> cancelled_;
    int64_t next_id_ = 1;
};

} // namespace caa

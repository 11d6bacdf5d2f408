// Batched block-output reads for CAA extraction (caa_local/engine/reads.py).
// The prefix common to every prompt is decoded once, into a KV stream of its own, and copied
// into each pair's stream; each pair's shared part (up to its answer) is decoded once; then
// the answers of many pairs go through llama_decode together. Only the needed rows of the
// needed l_out-N tensors are copied out, through the eval callback. No steering is applied.
#pragma once

#include "session.h"

#include <functional>
#include <string>
#include <vector>

namespace caa {

// One row of an l_out-N tensor to add into the output: weight x row, at `dst` (+ layer slot).
struct ReadPick {
    int32_t row;    // index of the token in the llama_decode batch
    int32_t output; // its index among the batch's output tokens (-1: not an output)
    size_t  dst;    // float offset of the (pair, sequence) block in the result
    float   weight; // 1 / tokens averaged
};

// State the eval callback sees while one llama_decode runs.
struct ReadProbe {
    std::vector<int32_t> layer_slot;           // block il -> its index among the layers read, or -1
    int32_t n_embd = 0;
    int32_t n_tokens = 0;                       // tokens in the batch being decoded
    int32_t n_outputs = 0;                      // of them, marked as outputs
    const std::vector<ReadPick> * picks = nullptr;
    float * out = nullptr;
    std::vector<float> row;                     // one row, copied from the backend
    std::string error;                          // set by the callback; checked after llama_decode
};

class Reader {
  public:
    // A context of its own on `session`'s model (and thread count).
    // prefix: tokens every sequence starts with (may be empty); decoded here, once.
    // layers: blocks whose outputs are read (l_out-N, N in 0..n_layer-1), in output order.
    // max_pairs: pairs decoded side by side (one KV stream each); max_len: most tokens of
    // any sequence passed to read().
    Reader(const Session & session, std::vector<llama_token> prefix, std::vector<int32_t> layers,
           int32_t max_pairs, int32_t max_len);

    // seqs[2p], seqs[2p+1]: pair p's matching and not-matching prompt, both starting with the
    // prefix. shared[p]: leading tokens the two have in common (prefix length <= shared[p] <
    // each length). n_read[2p+k]: trailing tokens of sequence 2p+k averaged, 1 .. its length
    // minus the prefix length. `check_interrupt` runs between llama_decode calls and may throw.
    // Returns n_pairs x 2 x n_layers x n_embd floats: pair-major, matching first.
    std::vector<float> read(const std::vector<std::vector<llama_token>> & seqs, const std::vector<int32_t> & shared,
                            const std::vector<int32_t> & n_read, const std::function<void()> & check_interrupt);

    int32_t max_pairs() const { return max_pairs_; }
    int32_t n_layers() const { return static_cast<int32_t>(layers_.size()); }
    size_t prefix_len() const { return prefix_.size(); }
    int32_t n_embd() const { return probe_.n_embd; }

  private:
    // One read() call: its arguments and where the result goes.
    struct Request {
        const std::vector<std::vector<llama_token>> & seqs;
        const std::vector<int32_t> & shared;
        const std::vector<int32_t> & n_read;
        const std::function<void()> & check_interrupt;
        float * out;
        // Tokens of sequence 2p+k after the part its pair shares.
        size_t tail(size_t p, int k) const { return seqs[2 * p + k].size() - static_cast<size_t>(shared[p]); }
    };
    // The batch being filled, with the rows to pick from it.
    struct Fill {
        explicit Fill(int32_t n_batch) : holder(n_batch) {}
        BatchPtr holder;
        std::vector<ReadPick> picks;
        int32_t n_out = 0; // output tokens in the batch so far
    };
    // Throws std::invalid_argument unless every pair fits the contract of read().
    void check_request(const Request & r) const;
    // Pairs start .. start+n-1 in the order their streams take (equal answer lengths adjacent).
    std::vector<size_t> stream_order(const Request & r, size_t start, size_t n) const;
    // Stream `slot` for pair order[slot]: the prefix's KV copied in, then the pair's shared part.
    void decode_shared(const Request & r, const std::vector<size_t> & order, Fill & fill);
    // Answer k of every pair, runs of equal lengths in one llama_decode; then each stream is
    // cut back to its shared part.
    void decode_answers(const Request & r, const std::vector<size_t> & order, int k, Fill & fill);
    // Adds token i of sequence 2p+k to the batch in stream `seq`; `both`: the token is in the
    // part the pair shares, so a read there counts for both of its sequences.
    void add(const Request & r, Fill & fill, size_t p, int k, size_t i, llama_seq_id seq, bool both);
    // Checks for an interrupt, decodes the batch and adds its picked rows into the result.
    void flush(const Request & r, Fill & fill);
    // Decodes holder's batch (n_tokens <= n_batch_, so llama.cpp makes one ubatch of it, in
    // batch order) and adds the picked rows into `out`.
    void decode(llama_batch & batch, const std::vector<ReadPick> & picks, float * out);

    SharedModel model_; // shared with the session it was made from; the context is its own
    std::vector<llama_token> prefix_;
    std::vector<int32_t> layers_;
    int32_t max_pairs_;
    int32_t max_len_;
    uint32_t n_batch_;
    bool outputs_needed_; // the last block is read: llama.cpp keeps only output rows there
    ReadProbe probe_;
    ContextPtr ctx_;
};

} // namespace caa

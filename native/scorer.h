// Batched scoring of answer continuations with the paper's position mask.
// Each question's unsteered prefix is decoded once and kept in its own KV stream; every setting
// (vector, layer, multiplier) then decodes only the steered tails, all questions in one batch.
#pragma once

#include "session.h"

namespace caa {

using Continuations = std::vector<std::vector<std::vector<llama_token>>>; // [question][option] -> tokens

class Scorer {
  public:
    // prefixes[q]: tokens before the end of question q's instruction (decoded unsteered, once).
    // n_options: continuations scored per question; max_tail: most tokens one continuation has.
    Scorer(const Session & session, const std::vector<std::vector<llama_token>> & prefixes, int32_t n_options,
           int32_t max_tail);

    // continuations[q][o]: tokens after prefix q, from the instruction-end token on; the last
    // n_scored[q][o] of them are scored (>= 1, and at least one unscored token before them).
    // Every continuation token but the last (only scored) is decoded with `steering`; options that
    // differ in their last token only share one decode. Returns the summed log-probability
    // of the scored tokens, n_questions x n_options, question-major.
    std::vector<double> score(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                              const Steering & steering);

    int32_t n_questions() const { return static_cast<int32_t>(prefix_len_.size()); }
    int32_t n_options() const { return n_options_; }
    int32_t max_tail() const { return max_tail_; }
    uint32_t n_ctx() const { return llama_n_ctx(ctx_.get()); } // KV cells of all streams together
    const Model & model() const { return *model_; }

  private:
    struct Pending {
        int32_t row;      // batch row whose logits score it
        size_t out;       // index into the result
        llama_token next; // token whose log-probability the output row scores
    };
    // Each question's prefix into its own KV stream (sequence id = question), no outputs.
    void decode_prefixes(const std::vector<std::vector<llama_token>> & prefixes);
    // Throws std::invalid_argument unless the request matches the questions and options.
    void check_request(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored) const;
    // Decodes option o of every question after its prefix, adding the scored log-probabilities.
    void score_option(int32_t o, const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                      std::vector<double> & result);
    // Whether every question's options differ in their last token only.
    bool inputs_shared(const Continuations & continuations) const;
    // Decodes each question's shared inputs once, scoring every option from the same rows.
    void score_shared(const Continuations & continuations, const std::vector<std::vector<int32_t>> & n_scored,
                      std::vector<double> & result);
    // Drops every question's continuation from its stream, back to the prefix.
    void drop_continuations();
    // llama_decode of `batch`, then each output row's log-probability of its pending token.
    void decode(llama_batch & batch, std::vector<Pending> & pending, std::vector<double> & result);

    SharedModel model_;
    ContextPtr ctx_;
    int32_t n_options_;
    int32_t max_tail_;
    uint32_t n_batch_;
    std::vector<llama_pos> prefix_len_;
};

} // namespace caa

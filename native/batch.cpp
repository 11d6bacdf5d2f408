#include "batch.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace caa {

namespace {

double seconds(std::chrono::steady_clock::duration d) {
    return std::chrono::duration<double>(d).count();
}

} // namespace

struct Batch::Live {
    int64_t id = 0;
    BatchRequest request;
    uint64_t steering_id = 0;
    SamplerPtr sampler;
    std::vector<llama_token> out;
    std::string pending; // bytes of a character still partial
    std::string held;    // text held back by the stop strings
    llama_token next = -1;
    int32_t n_reused = 0;
    Clock::time_point start;
    Clock::time_point decode_start;
    double prompt_seconds = 0.0;
    std::vector<float> logits;
    double logprob = 0.0; // a scoring request's
    int32_t n_scored = 0;
};

Batch::~Batch() = default;

Batch::Batch(SharedModel model, uint32_t n_seq, uint32_t n_ctx_seq, int32_t n_threads, uint32_t n_batch)
    : model_(std::move(model)), n_seq_(n_seq), n_threads_(pick_threads(n_threads)),
      n_batch_(std::max<uint32_t>(n_batch == 0 ? 512 : n_batch, n_seq)) {
    if (!model_) {
        throw std::invalid_argument("a Batch needs a loaded model");
    }
    if (n_seq < 1 || n_seq > max_sequences()) {
        throw std::invalid_argument("a batch holds 1.." + std::to_string(max_sequences()) + " sequences, got " +
                                    std::to_string(n_seq));
    }
    if (n_ctx_seq < 16) {
        throw std::invalid_argument("each sequence needs a context of at least 16 tokens, got " +
                                    std::to_string(n_ctx_seq));
    }
    probe_.n_embd = model_->n_embd();
    probe_.layer_on.assign(model_->n_layer(), 0);
    threadpool_ = std::make_unique<Threadpool>(n_threads_);
    const uint32_t per_seq = (n_ctx_seq + 255) / 256 * 256; // llama.cpp pads each stream to 256
    ctx_ = make_context(*model_, per_seq * n_seq, n_batch_, n_seq, n_threads_, row_steer_callback, &probe_);
    if (threadpool_->get() != nullptr) {
        llama_attach_threadpool(ctx_.get(), threadpool_->get(), nullptr);
    }
    n_batch_ = llama_n_batch(ctx_.get());
    n_ctx_seq_ = llama_n_ctx_seq(ctx_.get());
    seqs_.resize(n_seq);
    batch_ = std::make_unique<BatchPtr>(static_cast<int32_t>(n_batch_));
}

int64_t Batch::submit(BatchRequest request) {
    if (request.tokens.empty()) {
        throw std::invalid_argument("the prompt is empty");
    }
    if (request.steer_from > request.tokens.size()) {
        throw std::invalid_argument("steer_from " + std::to_string(request.steer_from) + " is outside the prompt of " +
                                    std::to_string(request.tokens.size()) + " tokens");
    }
    if (request.score_from == 0 || request.score_from >= static_cast<int64_t>(request.tokens.size())) {
        throw std::invalid_argument("score_from " + std::to_string(request.score_from) + " leaves no token to score in " +
                                    std::to_string(request.tokens.size()));
    }
    if (request.max_tokens < 1) {
        throw std::invalid_argument("max tokens must be at least 1, got " + std::to_string(request.max_tokens));
    }
    if (request.tokens.size() + 1 > n_ctx_seq_) {
        throw ContextFullError("prompt of " + std::to_string(request.tokens.size()) +
                               " tokens does not fit a sequence's context of " + std::to_string(n_ctx_seq_));
    }
    model_->check_tokens(request.tokens);
    validate_steering(request.steering, model_->n_layer(), model_->n_embd());
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_id_++;
    waiting_.emplace_back(id, std::move(request));
    return id;
}

void Batch::cancel(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_.push_back(id);
}

size_t Batch::n_live() const {
    return n_live_.load();
}

size_t Batch::n_waiting() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return waiting_.size();
}

size_t Batch::reusable(const Sequence & s, const BatchRequest & r, uint64_t steering_id) const {
    const size_t n = std::min(s.tokens.size(), r.tokens.size());
    size_t i = 0;
    for (; i < n; ++i) {
        const uint64_t wanted = i < r.steer_from ? 0 : steering_id;
        if (s.tokens[i] != r.tokens[i] || s.steering_ids[i] != wanted) {
            break;
        }
    }
    return i;
}

size_t Batch::share_prefix(uint32_t seq, size_t own) {
    // Requests often share a prompt prefix (a system prompt; one prompt under several steerings)
    // that another sequence, running or free, has decoded. llama.cpp copies KV between streams
    // only whole, so the copy must save more prefill than copying a stream costs: a token's
    // prefill takes about a thousand times longer than copying its KV (2.4 ms vs 2 us here).
    Sequence & s = seqs_[seq];
    const Live & live = *s.live;
    uint32_t best = seq;
    size_t best_len = own;
    for (uint32_t o = 0; o < n_seq_; ++o) {
        const size_t len = o == seq ? 0 : reusable(seqs_[o], live.request, live.steering_id);
        if (len > best_len) {
            best = o;
            best_len = len;
        }
    }
    if (best == seq || best_len < own + std::max<size_t>(16, n_ctx_seq_ / 128)) {
        return own;
    }
    // Copied at the next llama_decode (the prefill that follows): the source is not touched before.
    llama_memory_seq_cp(llama_get_memory(ctx_.get()), static_cast<llama_seq_id>(best), static_cast<llama_seq_id>(seq), -1, -1);
    const Sequence & from = seqs_[best];
    s.tokens = from.tokens;
    s.steering_ids = from.steering_ids;
    s.next = from.next;
    ++prefixes_shared_;
    return best_len;
}

void Batch::decode(llama_batch & batch, const std::vector<const Steering *> & rows, const std::vector<uint64_t> & ids) {
    // One steering (or none) for every row: llama.cpp's control vector. Mixed: per row.
    const Steering * first = rows.empty() ? nullptr : rows[0];
    const uint64_t first_id = ids.empty() ? 0 : ids[0];
    const bool uniform = std::all_of(ids.begin(), ids.end(), [first_id](uint64_t id) { return id == first_id; });
    const bool per_row = force_rows_ || !uniform;
    static const Steering none;
    const uint64_t cvec = per_row ? 0 : first_id;
    if (!cvec_known_ || applied_cvec_ != cvec) {
        // One call per change: each makes the scheduler re-reserve its graph.
        apply_steering(ctx_.get(), cvec != 0 ? *first : none, model_->n_embd());
        applied_cvec_ = cvec;
        cvec_known_ = true;
    }
    std::fill(probe_.layer_on.begin(), probe_.layer_on.end(), 0);
    probe_.rows.clear();
    if (per_row) {
        probe_.rows = rows;
        probe_.row_output.assign(rows.size(), -1);
        probe_.n_outputs = 0;
        probe_.consumed.assign(probe_.layer_on.size(), 0);
        for (int32_t k = 0; k < batch.n_tokens; ++k) {
            if (batch.logits[k]) {
                probe_.row_output[k] = probe_.n_outputs++;
            }
        }
        const Steering * last = nullptr;
        for (const Steering * s : rows) {
            if (s == nullptr || s == last) {
                continue;
            }
            last = s;
            for (int32_t il = s->il_start; il <= s->il_end; ++il) {
                probe_.layer_on[il] = 1;
            }
        }
    }
    probe_.error.clear();
    const int32_t rc = llama_decode(ctx_.get(), batch);
    probe_.rows.clear();
    std::fill(probe_.layer_on.begin(), probe_.layer_on.end(), 0);
    ++(per_row ? decodes_rows_ : decodes_cvec_);
    if (rc != 0) {
        throw std::runtime_error("llama_decode failed with code " + std::to_string(rc));
    }
    if (!probe_.error.empty()) {
        throw std::runtime_error("steering rows: " + probe_.error);
    }
}

uint32_t Batch::free_sequence(const BatchRequest & r, uint64_t steering_id, const std::vector<char> & written) const {
    // The free sequence whose cache shares the longest prefix; the lowest id on a tie
    // (llama.cpp decodes consecutive sequence ids in one ubatch). A cache that a request of
    // this admission left (a scoring request ends at once) is overwritten only when no other
    // sequence is free, so requests scored together (two steerings' answers to one prompt)
    // each keep theirs for the next turn.
    for (const bool spare_written : {true, false}) {
        uint32_t best = n_seq_;
        size_t best_len = 0;
        for (uint32_t s = 0; s < n_seq_; ++s) {
            if (seqs_[s].live) {
                continue;
            }
            const size_t len = reusable(seqs_[s], r, steering_id);
            if (spare_written && written[s] && len < seqs_[s].tokens.size()) {
                continue;
            }
            if (best == n_seq_ || len > best_len) {
                best = s;
                best_len = len;
            }
        }
        if (best != n_seq_) {
            return best;
        }
    }
    throw std::logic_error("no free sequence to admit a request into");
}

void Batch::admit(std::vector<BatchEvent> & events) {
    std::vector<char> written(n_seq_, 0); // sequences a request of this admission left its cache in
    while (true) {
        std::pair<int64_t, BatchRequest> next;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (waiting_.empty()) {
                return;
            }
            bool free = false;
            for (const Sequence & s : seqs_) {
                free = free || !s.live;
            }
            if (!free) {
                return;
            }
            next = std::move(waiting_.front());
            waiting_.pop_front();
        }
        auto live = std::make_unique<Live>();
        live->id = next.first;
        live->request = std::move(next.second);
        live->steering_id = live->request.steering.id();
        live->start = Clock::now();
        const uint32_t best = free_sequence(live->request, live->steering_id, written);
        seqs_[best].live = std::move(live);
        ++n_live_;
        prefill(best, events);
        written[best] = 1;
    }
}

void Batch::prefill(uint32_t seq, std::vector<BatchEvent> & events) {
    Sequence & s = seqs_[seq];
    Live & live = *s.live;
    const BatchRequest & r = live.request;
    // The last prompt token is always decoded again: its logits start the answer. A scoring
    // request decodes again from the token before the first scored one.
    const bool scoring = r.score_from > 0;
    size_t first_out = scoring ? static_cast<size_t>(r.score_from) - 1 : r.tokens.size() - 1;
    const size_t cached = share_prefix(seq, reusable(s, r, live.steering_id));
    if (scoring && !r.steering.active()) {
        // Positions whose next token an unsteered decode already scored (keep_logprobs).
        for (; first_out < cached && first_out + 1 < r.tokens.size() && s.next[first_out].token == r.tokens[first_out + 1];
             ++first_out) {
            live.logprob += s.next[first_out].logprob;
            ++live.n_scored;
            ++scored_from_cache_;
        }
    }
    size_t keep = std::min(cached, first_out);
    if (scoring && first_out + 1 == r.tokens.size()) {
        keep = std::min(cached, r.tokens.size()); // every token scored from the cache
    }
    llama_memory_t mem = llama_get_memory(ctx_.get());
    if (keep < s.tokens.size() && !llama_memory_seq_rm(mem, static_cast<llama_seq_id>(seq), static_cast<llama_pos>(keep), -1)) {
        llama_memory_seq_rm(mem, static_cast<llama_seq_id>(seq), -1, -1);
        keep = 0;
    }
    s.tokens.resize(keep);
    s.steering_ids.resize(keep);
    s.next.resize(keep);
    live.n_reused = static_cast<int32_t>(keep);
    const Steering * steered = r.steering.active() ? &r.steering : nullptr;
    llama_batch & batch = batch_->batch;
    std::vector<const Steering *> rows;
    std::vector<uint64_t> ids;
    int32_t last_row = -1;
    // Two parts, each in chunks of n_batch: before steer_from unsteered, the rest steered.
    const size_t bounds[3] = {keep, std::max(keep, r.steer_from), r.tokens.size()};
    for (int part = 0; part < 2; ++part) {
        for (size_t start = bounds[part]; start < bounds[part + 1]; start += n_batch_) {
            const size_t end = std::min(bounds[part + 1], start + n_batch_);
            batch.n_tokens = 0;
            rows.assign(end - start, part == 0 ? nullptr : steered);
            ids.assign(end - start, part == 0 || steered == nullptr ? 0 : live.steering_id);
            for (size_t i = start; i < end; ++i) {
                const bool output = scoring ? i >= first_out && i + 1 < r.tokens.size() : i + 1 == r.tokens.size();
                add_token(batch, r.tokens[i], static_cast<llama_pos>(i), static_cast<llama_seq_id>(seq), output);
            }
            decode(batch, rows, ids);
            if (scoring && end > first_out) {
                const size_t from = std::max(start, first_out);
                add_logprobs(live, from, static_cast<int32_t>(std::min(end, r.tokens.size() - 1) - from),
                             static_cast<int32_t>(from - start));
            }
            s.tokens.insert(s.tokens.end(), r.tokens.begin() + start, r.tokens.begin() + end);
            s.steering_ids.insert(s.steering_ids.end(), end - start, part == 0 ? 0 : live.steering_id);
            s.next.resize(s.tokens.size());
            last_row = batch.n_tokens - 1;
        }
    }
    if (scoring) {
        live.decode_start = Clock::now();
        live.prompt_seconds = seconds(live.decode_start - live.start);
        finish(seq, "scored", events);
        return;
    }
    live.sampler = make_sampler(r.sampling, model_->n_vocab());
    const size_t tail = std::min<size_t>(s.tokens.size(), std::max(r.sampling.repeat_last_n, 0));
    for (size_t i = s.tokens.size() - tail; i < s.tokens.size(); ++i) {
        llama_sampler_accept(live.sampler.get(), s.tokens[i]);
    }
    live.decode_start = Clock::now();
    live.prompt_seconds = seconds(live.decode_start - live.start);
    sample(seq, last_row, events);
}

void Batch::add_logprobs(Live & live, size_t first_pos, int32_t n_rows, int32_t first_row) {
    const int32_t n_vocab = model_->n_vocab();
    for (int32_t k = 0; k < n_rows; ++k) {
        const float * logits = llama_get_logits_ith(ctx_.get(), first_row + k);
        if (logits == nullptr) {
            throw std::runtime_error("llama.cpp kept no logits for batch row " + std::to_string(first_row + k));
        }
        const llama_token next = live.request.tokens[first_pos + static_cast<size_t>(k) + 1];
        live.logprob += static_cast<double>(logits[next]) - log_sum_exp(logits, n_vocab);
        ++live.n_scored;
    }
}

bool Batch::sample(uint32_t seq, int32_t idx, std::vector<BatchEvent> & events) {
    Sequence & s = seqs_[seq];
    Live & live = *s.live;
    if (live.request.record_logits) {
        const float * logits = llama_get_logits_ith(ctx_.get(), idx);
        if (logits == nullptr) {
            throw std::runtime_error("llama.cpp kept no logits for batch row " + std::to_string(idx));
        }
        live.logits.insert(live.logits.end(), logits, logits + model_->n_vocab());
    }
    const llama_token token = llama_sampler_sample(live.sampler.get(), ctx_.get(), idx);
    if (keep_logprobs_ && !live.request.steering.active()) {
        const float * logits = llama_get_logits_ith(ctx_.get(), idx);
        s.next.back() = {token, static_cast<double>(logits[token]) - log_sum_exp(logits, model_->n_vocab())};
    }
    if (model_->is_eog(token)) {
        finish(seq, "eog", events);
        return false;
    }
    live.out.push_back(token);
    live.pending += model_->token_to_piece(token, false);
    const size_t ready = utf8_complete_prefix(live.pending);
    bool stopped = false;
    const std::string text = filter_stops(live.request.stops, live.held, live.pending.substr(0, ready), stopped);
    live.pending.erase(0, ready);
    if (!text.empty()) {
        BatchEvent e;
        e.id = live.id;
        e.piece = text;
        events.push_back(std::move(e));
    }
    if (stopped) {
        finish(seq, "stop", events);
        return false;
    }
    if (static_cast<int32_t>(live.out.size()) >= live.request.max_tokens) {
        finish(seq, "max_tokens", events);
        return false;
    }
    if (s.tokens.size() + 1 > n_ctx_seq_) {
        finish(seq, "context", events);
        return false;
    }
    live.next = token;
    return true;
}

void Batch::finish(uint32_t seq, const std::string & reason, std::vector<BatchEvent> & events) {
    std::unique_ptr<Live> live = std::move(seqs_[seq].live);
    --n_live_;
    BatchEvent e;
    e.id = live->id;
    // What is left: a partial character (sent as is) and text held back by the stop strings.
    if (reason != "stop") {
        e.piece = live->held + live->pending;
    }
    e.done = true;
    e.stop_reason = reason;
    e.tokens = std::move(live->out);
    e.n_prompt = static_cast<int32_t>(live->request.tokens.size());
    e.n_reused = live->n_reused;
    e.prompt_seconds = live->prompt_seconds;
    e.decode_seconds = seconds(Clock::now() - live->decode_start);
    e.logits = std::move(live->logits);
    e.logprob = live->logprob;
    e.n_scored = live->n_scored;
    events.push_back(std::move(e));
}

void Batch::decode_step(std::vector<BatchEvent> & events) {
    llama_batch & batch = batch_->batch;
    batch.n_tokens = 0;
    std::vector<const Steering *> rows;
    std::vector<uint64_t> ids;
    std::vector<uint32_t> row_seq;
    // Sequence ids in increasing order: llama.cpp puts consecutive ones in one ubatch.
    for (uint32_t s = 0; s < n_seq_; ++s) {
        if (!seqs_[s].live) {
            continue;
        }
        Live & live = *seqs_[s].live;
        add_token(batch, live.next, static_cast<llama_pos>(seqs_[s].tokens.size()), static_cast<llama_seq_id>(s), true);
        rows.push_back(live.request.steering.active() ? &live.request.steering : nullptr);
        ids.push_back(live.steering_id);
        row_seq.push_back(s);
    }
    if (batch.n_tokens == 0) {
        return;
    }
    decode(batch, rows, ids);
    for (size_t k = 0; k < row_seq.size(); ++k) {
        Sequence & s = seqs_[row_seq[k]];
        s.tokens.push_back(s.live->next);
        s.steering_ids.push_back(s.live->steering_id);
        s.next.emplace_back();
    }
    for (size_t k = 0; k < row_seq.size(); ++k) {
        sample(row_seq[k], static_cast<int32_t>(k), events);
    }
}

std::vector<BatchEvent> Batch::step() {
    std::vector<BatchEvent> events;
    std::vector<int64_t> cancelled;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        cancelled.swap(cancelled_);
        for (auto it = waiting_.begin(); it != waiting_.end();) {
            if (std::find(cancelled.begin(), cancelled.end(), it->first) != cancelled.end()) {
                BatchEvent e;
                e.id = it->first;
                e.done = true;
                e.stop_reason = "cancelled";
                e.n_prompt = static_cast<int32_t>(it->second.tokens.size());
                events.push_back(std::move(e));
                it = waiting_.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (uint32_t s = 0; s < n_seq_; ++s) {
        if (seqs_[s].live && std::find(cancelled.begin(), cancelled.end(), seqs_[s].live->id) != cancelled.end()) {
            finish(s, "cancelled", events);
        }
    }
    admit(events);
    decode_step(events);
    return events;
}

void Batch::drop(const std::vector<int64_t> & ids) {
    auto listed = [&ids](int64_t id) { return std::find(ids.begin(), ids.end(), id) != ids.end(); };
    {
        std::lock_guard<std::mutex> lock(mutex_);
        waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), [&](const auto & w) { return listed(w.first); }),
                       waiting_.end());
    }
    for (Sequence & s : seqs_) {
        if (s.live && listed(s.live->id)) {
            s.live.reset();
            --n_live_;
        }
    }
}

std::vector<BatchEvent> Batch::run(std::vector<BatchRequest> requests, const std::function<void()> & check_interrupt) {
    std::vector<int64_t> ids;
    try {
        for (BatchRequest & r : requests) {
            ids.push_back(submit(std::move(r)));
        }
        return run_ids(ids, check_interrupt);
    } catch (...) {
        drop(ids); // an interrupt or an error leaves no request of this run behind
        throw;
    }
}

std::vector<BatchEvent> Batch::run_ids(const std::vector<int64_t> & ids, const std::function<void()> & check_interrupt) {
    std::vector<BatchEvent> results(ids.size());
    std::vector<std::string> texts(ids.size());
    size_t n_done = 0;
    auto index_of = [&](int64_t id) -> size_t {
        return static_cast<size_t>(std::find(ids.begin(), ids.end(), id) - ids.begin());
    };
    while (n_done < ids.size()) {
        if (check_interrupt) {
            check_interrupt();
        }
        for (BatchEvent & e : step()) {
            const size_t i = index_of(e.id);
            if (i == ids.size()) {
                continue; // a request submitted by someone else
            }
            texts[i] += e.piece;
            if (e.done) {
                results[i] = std::move(e);
                results[i].piece = texts[i];
                ++n_done;
            }
        }
    }
    return results;
}

} // namespace caa

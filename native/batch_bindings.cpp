// Python bindings of the batch: caa_local.engine._native.Batch and BatchRequest.
// step() and run() release the GIL while llama.cpp decodes; Python sees one list of events per
// step (or the whole results of run()), never a callback per token.
#include "batch.h"
#include "bindings.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// (id, piece, done, stop_reason, tokens, n_prompt, n_reused, prompt_seconds, decode_seconds, logits,
//  logprob, n_scored); logits: None, or (positions, n_vocab) float32 when the request recorded them.
nb::tuple to_tuple(caa::BatchEvent & e, size_t n_vocab) {
    nb::object logits = nb::none();
    if (!e.logits.empty()) {
        const size_t n_positions = e.logits.size() / n_vocab;
        logits = nb::cast(caa::to_numpy(std::move(e.logits), {n_positions, n_vocab}));
    }
    return nb::make_tuple(e.id, caa::lenient_str(e.piece), e.done, e.stop_reason, e.tokens, e.n_prompt, e.n_reused,
                          e.prompt_seconds, e.decode_seconds, logits, e.logprob, e.n_scored);
}

nb::list to_list(std::vector<caa::BatchEvent> & events, size_t n_vocab) {
    nb::list out;
    for (caa::BatchEvent & e : events) {
        out.append(to_tuple(e, n_vocab));
    }
    return out;
}

} // namespace

void bind_batch(nb::module_ & m) {
    nb::class_<caa::BatchRequest>(m, "BatchRequest")
        .def(
            "__init__",
            [](caa::BatchRequest * r, const caa::Model & model, std::vector<llama_token> tokens, size_t steer_from,
               const caa::SamplingParams & sampling, int32_t max_tokens, std::vector<std::string> stops,
               nb::object buf, int32_t il_start, int32_t il_end, bool record_logits, int64_t score_from) {
                new (r) caa::BatchRequest{std::move(tokens), steer_from, {}, sampling, max_tokens, std::move(stops),
                                          record_logits, score_from};
                if (!buf.is_none()) {
                    r->steering = caa::to_steering(model, nb::cast<caa::FloatMatrix>(buf), il_start, il_end);
                }
            },
            "model"_a, "tokens"_a, "steer_from"_a, "sampling"_a, "max_tokens"_a, "stops"_a = std::vector<std::string>{},
            "buf"_a = nb::none(), "il_start"_a = -1, "il_end"_a = -1, "record_logits"_a = false,
            "score_from"_a = -1,
            "One conversation: prompt tokens (positions < steer_from unsteered), sampling, token budget, "
            "stop strings and steering (buf (n_layer-1, n_embd) float32 from layer 1, layers "
            "il_start..il_end; None: unsteered). record_logits keeps every sampled position's logits. "
            "score_from >= 1: score tokens[score_from:] instead of answering (logprob, n_scored).");

    nb::class_<caa::Batch>(m, "Batch")
        .def(nb::init<caa::SharedModel, uint32_t, uint32_t, int32_t, uint32_t>(), "model"_a, "n_seq"_a,
             "n_ctx_seq"_a = 4096, "n_threads"_a = 0, "n_batch"_a = 512, nb::call_guard<nb::gil_scoped_release>(),
             "A context holding n_seq sequences (one KV stream each) of n_ctx_seq tokens.")
        .def_prop_ro("n_seq", &caa::Batch::n_seq)
        .def_prop_ro("n_ctx_seq", &caa::Batch::n_ctx_seq)
        .def_prop_ro("n_threads", &caa::Batch::n_threads)
        .def_prop_ro("n_live", &caa::Batch::n_live)
        .def_prop_ro("n_waiting", &caa::Batch::n_waiting)
        .def_prop_rw("force_rows", &caa::Batch::force_rows, &caa::Batch::set_force_rows,
                     "Add directions per row even where every row shares one steering (checks, benchmarks).")
        .def_prop_rw("keep_logprobs", &caa::Batch::keep_logprobs, &caa::Batch::set_keep_logprobs,
                     "Keep what unsteered requests sampled, scored: later scoring requests read it from the cache.")
        .def_prop_ro("counters",
                     [](const caa::Batch & b) {
                         return nb::make_tuple(b.decodes_cvec(), b.decodes_rows(), b.rows_added(), b.scored_from_cache(),
                                               b.prefixes_shared());
                     },
                     "(llama_decode calls through the control vector, calls with per-row directions, "
                     "row additions made, scored tokens read from the cache, prompt prefixes copied from "
                     "another sequence).")
        .def("submit", &caa::Batch::submit, "request"_a, "Queue a request (thread-safe); returns its id.")
        .def("cancel", &caa::Batch::cancel, "id"_a, "Stop a queued or running request at the next step (thread-safe).")
        .def("step",
             [](caa::Batch & b) {
                 std::vector<caa::BatchEvent> events;
                 {
                     nb::gil_scoped_release release;
                     events = b.step();
                 }
                 return to_list(events, static_cast<size_t>(b.model().n_vocab()));
             },
             "Admit waiting requests, decode one token of every live one. Returns events (id, piece, "
             "done, stop_reason, tokens, n_prompt, n_reused, prompt_seconds, decode_seconds).")
        .def("run",
             [](caa::Batch & b, std::vector<caa::BatchRequest> requests) {
                 std::vector<caa::BatchEvent> results;
                 {
                     nb::gil_scoped_release release;
                     results = b.run(std::move(requests), [] {
                         nb::gil_scoped_acquire gil;
                         if (PyErr_CheckSignals() != 0) {
                             throw nb::python_error();
                         }
                     });
                 }
                 return to_list(results, static_cast<size_t>(b.model().n_vocab()));
             },
             "requests"_a, "Answer every request; one event per request, in order, piece = the whole answer.");
}

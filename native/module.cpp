// Python bindings: caa_local.engine._native.Model, Session, SamplingParams and Scorer.
// A Model is loaded once and shared (shared_ptr) by every Session made on it. Long llama.cpp
// work runs with the GIL released, so Sessions on other threads decode at the same time;
// Ctrl-C and should_stop() are checked between batches and tokens.
#include "bindings.h"
#include "scorer.h"
#include "session.h"

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

using caa::FloatMatrix;
using caa::lenient_str;
using caa::to_steering;

// Called with the GIL held: raises KeyboardInterrupt on Ctrl-C (main thread only, as Python
// delivers signals there), then asks should_stop.
bool stop_requested(const nb::object & should_stop) {
    if (PyErr_CheckSignals() != 0) {
        throw nb::python_error();
    }
    return !should_stop.is_none() && nb::cast<bool>(should_stop());
}

} // namespace

void bind_reader(nb::module_ & m);    // reader_bindings.cpp
void bind_rpc(nb::module_ & m);       // rpc_bindings.cpp
void bind_condition(nb::module_ & m); // condition_bindings.cpp
void bind_batch(nb::module_ & m);     // batch_bindings.cpp

NB_MODULE(_native, m) {
    m.doc() = "caa-local's llama.cpp engine: steered generation and batched scoring";
    nb::exception<caa::ContextFullError>(m, "ContextFullError", PyExc_RuntimeError);
    m.attr("LLAMA_MAX_SEQ") = caa::max_sequences();

    nb::class_<caa::Model>(m, "Model")
        .def(
            "__init__",
            [](caa::Model * self, const std::string & path, int32_t n_gpu_layers, const std::vector<std::string> & rpc,
               int32_t flash_attn) {
                if (flash_attn < -1 || flash_attn > 1) {
                    throw std::invalid_argument("flash_attn must be -1 (auto), 0 (off) or 1 (on)");
                }
                new (self) caa::Model(path, n_gpu_layers, rpc, static_cast<llama_flash_attn_type>(flash_attn));
            },
            "path"_a, "n_gpu_layers"_a = 0, "rpc"_a = std::vector<std::string>{}, "flash_attn"_a = -1,
            nb::call_guard<nb::gil_scoped_release>(),
            "Load a GGUF model; n_gpu_layers < 0 offloads all; rpc: host:port of llama.cpp RPC workers, "
            "offloaded to first; flash_attn: -1 auto (llama.cpp chooses per device), 0 off, 1 on.")
        .def_prop_ro("flash_attn", [](const caa::Model & s) { return static_cast<int32_t>(s.flash_attn()); },
                     "-1 (llama.cpp decides per device), 0 (off) or 1 (on): what every context gets.")
        .def_prop_ro("n_embd", &caa::Model::n_embd)
        .def_prop_ro("n_layer", &caa::Model::n_layer)
        .def_prop_ro("n_vocab", &caa::Model::n_vocab)
        .def("meta", [](const caa::Model & s, const std::string & key) { return lenient_str(s.meta(key)); },
             "key"_a, "Model metadata value as a string, '' when absent.")
        // Without the GIL: a server tokenizes a long prompt on a worker thread while its event loop runs.
        .def("tokenize", &caa::Model::tokenize, "text"_a, "add_special"_a = false, "parse_special"_a = true,
             nb::call_guard<nb::gil_scoped_release>())
        .def("token_to_piece",
             [](const caa::Model & s, llama_token t, bool special) {
                 const std::string piece = s.token_to_piece(t, special);
                 return nb::bytes(piece.data(), piece.size());
             },
             "token"_a, "special"_a = false, "Raw bytes of one token (may be part of a UTF-8 character).")
        .def("detokenize",
             [](const caa::Model & s, const std::vector<llama_token> & tokens, bool special) {
                 return lenient_str(s.detokenize(tokens, special));
             },
             "tokens"_a, "special"_a = false)
        .def("is_eog", &caa::Model::is_eog, "token"_a);

    nb::class_<caa::SamplingParams>(m, "SamplingParams")
        .def(
            "__init__",
            [](caa::SamplingParams * p, float temperature, float top_p, int32_t top_k, float min_p,
               float repeat_penalty, int32_t repeat_last_n, uint32_t seed) {
                new (p) caa::SamplingParams{temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n, seed};
            },
            nb::kw_only(), "temperature"_a = 0.0f, "top_p"_a = 1.0f, "top_k"_a = 0, "min_p"_a = 0.0f,
            "repeat_penalty"_a = 1.0f, "repeat_last_n"_a = 64, "seed"_a = 0u)
        .def_rw("temperature", &caa::SamplingParams::temperature)
        .def_rw("top_p", &caa::SamplingParams::top_p)
        .def_rw("top_k", &caa::SamplingParams::top_k)
        .def_rw("min_p", &caa::SamplingParams::min_p)
        .def_rw("repeat_penalty", &caa::SamplingParams::repeat_penalty)
        .def_rw("repeat_last_n", &caa::SamplingParams::repeat_last_n)
        .def_rw("seed", &caa::SamplingParams::seed);

    nb::class_<caa::Session>(m, "Session")
        .def(nb::init<caa::SharedModel, uint32_t, int32_t, uint32_t>(), "model"_a, "n_ctx"_a = 4096,
             "n_threads"_a = 0, "n_batch"_a = 512, nb::call_guard<nb::gil_scoped_release>(),
             "A context (own KV cache and steering) on a loaded Model. n_threads <= 0: every "
             "hardware thread the OS reports.")
        .def_prop_ro("model", &caa::Session::shared_model)
        .def_prop_ro("n_ctx", &caa::Session::n_ctx)
        .def_prop_ro("n_threads", &caa::Session::n_threads)
        .def_prop_ro("n_batch", &caa::Session::n_batch)
        .def("set_steering",
             [](caa::Session & s, FloatMatrix buf, int32_t il_start, int32_t il_end) {
                 s.set_steering(to_steering(s.model(), buf, il_start, il_end));
             },
             "buf"_a, "il_start"_a, "il_end"_a,
             "Steering for tokens decoded steered: buf is (n_layer-1, n_embd) float32 from layer 1; "
             "layers il_start..il_end (inclusive) apply.")
        .def("clear_steering", &caa::Session::clear_steering)
        .def_prop_ro("steering_active", [](const caa::Session & s) { return s.steering().active(); })
        .def_prop_ro("steering_id", &caa::Session::steering_id, "Fingerprint of the current steering (0: none).")
        .def_prop_ro("tokens", [](const caa::Session & s) { return s.tokens(); }, "Tokens in the KV cache, in order.")
        .def_prop_ro("token_steering", [](const caa::Session & s) { return s.token_steering(); },
                     "Per cached position, the steering id it was decoded with (0: none).")
        .def("reusable", &caa::Session::reusable, "tokens"_a, "steer_from"_a,
             "Length of the cached prefix equal to tokens and decoded with the steering now "
             "requested for it (none before steer_from, the current steering from there).")
        .def_prop_ro("perf_counts",
                     [](const caa::Session & s) {
                         const llama_perf_context_data d = llama_perf_context(s.context());
                         return nb::make_tuple(d.n_p_eval, d.n_eval, d.n_reused);
                     },
                     "llama.cpp's counters for this context: (prompt tokens, single-token decodes, "
                     "graphs reused).")
        .def("truncate", &caa::Session::truncate, "n_keep"_a, "Drop cached tokens from position n_keep on.")
        .def("decode",
             [](caa::Session & s, const std::vector<llama_token> & tokens, bool steered, nb::object should_stop) {
                 caa::StopCheck check = [&should_stop]() {
                     nb::gil_scoped_acquire gil;
                     return stop_requested(should_stop);
                 };
                 nb::gil_scoped_release release;
                 return s.decode(tokens, steered, check);
             },
             "tokens"_a, "steered"_a, "should_stop"_a = nb::none(),
             "Append tokens to the cache; steered=False decodes them with no vector. Returns False "
             "when should_stop() ended it between batches.")
        .def("generate",
             [](caa::Session & s, int32_t max_tokens, const caa::SamplingParams & params, nb::object on_piece,
                nb::object should_stop) {
                 caa::TokenCallback callback = [&on_piece, &should_stop](const std::string & piece) -> std::string {
                     nb::gil_scoped_acquire gil;
                     if (!piece.empty() && !on_piece.is_none()) {
                         nb::object go_on = on_piece(lenient_str(piece));
                         if (!go_on.is_none() && !nb::cast<bool>(go_on)) {
                             return "callback";
                         }
                     }
                     return stop_requested(should_stop) ? "stopped" : "";
                 };
                 caa::GenerateResult r;
                 {
                     nb::gil_scoped_release release;
                     r = s.generate(max_tokens, params, callback);
                 }
                 return nb::make_tuple(r.tokens, r.stop_reason);
             },
             "max_tokens"_a, "params"_a, "on_piece"_a = nb::none(), "should_stop"_a = nb::none(),
             "Sample after the cached tokens, each decoded steered. on_piece(str) -> False stops "
             "('callback'); should_stop() -> True stops ('stopped'). Returns (tokens, stop_reason) "
             "with stop_reason in eog, max_tokens, context, callback, stopped.")
        .def("layer_outputs",
             [](const caa::Session & s, const std::vector<llama_token> & tokens, size_t steer_from) {
                 std::vector<float> out;
                 {
                     nb::gil_scoped_release release;
                     out = s.layer_outputs(tokens, steer_from);
                 }
                 return caa::to_numpy(std::move(out), {static_cast<size_t>(s.model().n_layer()),
                                                  static_cast<size_t>(s.model().n_embd())});
             },
             "tokens"_a, "steer_from"_a,
             "Output of every block (row N = l_out-N) at the last token, in a fresh context.")
        .def("logits_after",
             [](const caa::Session & s, const std::vector<llama_token> & tokens, size_t steer_from) {
                 std::vector<float> out;
                 {
                     nb::gil_scoped_release release;
                     out = s.logits_after(tokens, steer_from);
                 }
                 return caa::to_numpy(std::move(out), {static_cast<size_t>(s.model().n_vocab())});
             },
             "tokens"_a, "steer_from"_a, "Next-token logits after tokens, in a fresh context.");

    nb::class_<caa::Scorer>(m, "Scorer")
        .def(nb::init<const caa::Session &, const std::vector<std::vector<llama_token>> &, int32_t, int32_t>(),
             "session"_a, "prefixes"_a, "n_options"_a, "max_tail"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Decode each question's unsteered prefix once, for scoring many settings.")
        .def_prop_ro("n_questions", &caa::Scorer::n_questions)
        .def_prop_ro("n_options", &caa::Scorer::n_options)
        .def_prop_ro("max_tail", &caa::Scorer::max_tail)
        .def_prop_ro("n_ctx", &caa::Scorer::n_ctx)
        .def("score",
             [](caa::Scorer & sc, const std::vector<std::vector<std::vector<llama_token>>> & continuations,
                const std::vector<std::vector<int32_t>> & n_scored, nb::object buf, int32_t il_start, int32_t il_end) {
                 caa::Steering steering;
                 if (!buf.is_none()) {
                     steering = to_steering(sc.model(), nb::cast<FloatMatrix>(buf), il_start, il_end);
                 }
                 std::vector<double> out;
                 {
                     nb::gil_scoped_release release;
                     out = sc.score(continuations, n_scored, steering);
                 }
                 return caa::to_numpy(std::move(out),
                                 {static_cast<size_t>(sc.n_questions()), static_cast<size_t>(sc.n_options())});
             },
             "continuations"_a, "n_scored"_a, "buf"_a = nb::none(), "il_start"_a = -1, "il_end"_a = -1,
             "Summed log-probabilities of the last n_scored tokens of each continuation, all decoded "
             "with the given steering (None: unsteered). Returns (n_questions, n_options).");
    bind_reader(m);
    bind_rpc(m);
    bind_condition(m);
    bind_batch(m);
}

// Streamed answer text: whole UTF-8 characters only, and stop strings that end an answer.
#pragma once

#include <string>
#include <vector>

namespace caa {

// Length of the longest prefix of `s` that is complete UTF-8 (a token may end mid-character).
size_t utf8_complete_prefix(const std::string & s);

// Feeds `piece` through the stop strings: returns the text that may be sent now; sets `stopped`
// once a stop string is met (the text before it is returned, the rest dropped). Text that could
// be the start of a stop string is held back in `held`.
std::string filter_stops(const std::vector<std::string> & stops, std::string & held, const std::string & piece,
                         bool & stopped);

} // namespace caa

#include "text.h"

#include <algorithm>

namespace caa {

size_t utf8_complete_prefix(const std::string & s) {
    size_t i = s.size();
    size_t back = 0;
    while (i > 0 && back < 4) {
        const unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {
            size_t need = (c & 0x80) == 0 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
            return back + 1 >= need ? s.size() : i - 1;
        }
        --i;
        ++back;
    }
    return s.size();
}

std::string filter_stops(const std::vector<std::string> & stops, std::string & held, const std::string & piece,
                         bool & stopped) {
    if (stops.empty()) {
        return piece;
    }
    held += piece;
    size_t at = std::string::npos;
    for (const std::string & s : stops) {
        at = std::min(at, held.find(s));
    }
    if (at != std::string::npos) {
        std::string out = held.substr(0, at);
        held.clear();
        stopped = true;
        return out;
    }
    size_t hold = 0;
    for (const std::string & s : stops) {
        for (size_t size = std::min(s.size() - 1, held.size()); size > hold; --size) {
            if (held.compare(held.size() - size, size, s, 0, size) == 0) {
                hold = size;
                break;
            }
        }
    }
    std::string out = held.substr(0, held.size() - hold);
    held.erase(0, held.size() - hold);
    return out;
}

} // namespace caa

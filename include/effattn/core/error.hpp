// Errors thrown by every entry point. Messages name the argument and the values seen.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace effattn {

/// A bad argument: shapes that disagree, a null pointer, an unsupported size or type.
struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A CUDA runtime or library failure; the message carries CUDA's own error text.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream s;
  (s << ... << std::forward<Parts>(parts));
  return s.str();
}

/// Throws effattn::Error built from the streamed parts when `ok` is false.
template <class... Parts>
inline void require(bool ok, Parts&&... parts) {
  if (!ok) throw Error(concat(std::forward<Parts>(parts)...));
}

}  // namespace detail
}  // namespace effattn

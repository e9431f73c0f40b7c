// Compiled with -fsyntax-only by the tests compile_fail.attention_with_lse and
// compile_fail.attention_backward, which pass when the compiler stops at the entry point's
// static_assert naming what the backend lacks (not at a template error deep inside it). A backend
// with a forward softmax only, like the CUDA backend today.
#include <effattn/effattn.hpp>

struct ForwardOnly {};

namespace effattn {
template <>
struct Exec<ForwardOnly> {
  void* workspace = nullptr;
  size_t workspace_size = 0;
};
template <>
struct Operator<ForwardOnly, Softmax> {
  template <class T>
  static void run(const Softmax&, Tensor<const T>, Tensor<const T>, Tensor<const T>, Tensor<T>, const Masks&,
                  const Exec<ForwardOnly>&) {}
};
}  // namespace effattn

int main() {
  float data[8] = {};
  const effattn::Tensor<float> t = effattn::bhsd(data, 1, 1, 2, 2);
  const effattn::Tensor<const float> c = t;
#if defined(EFFATTN_WANT_LSE)
  effattn::attention_with_lse<ForwardOnly>(effattn::Softmax{}, c, c, c, t, effattn::bhsd(data, 1, 1, 2, 1));
#else
  effattn::attention_backward<ForwardOnly>(effattn::Softmax{}, c, c, c, c, c, effattn::Grads<float>{t, t, t, {}, {}});
#endif
  return 0;
}

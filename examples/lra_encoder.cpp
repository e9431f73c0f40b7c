// lra_encoder: the Long Range Arena text classifier of the Nyströmformer / Performer /
// Proxyformer papers as a C++ forward pass on the CPU, with the attention chosen on the command
// line. Shows how effattn::attention slots into a model: q, k and v are strided views into one
// fused QKV projection (no copies), and the workspace is sized with workspace_bytes and owned
// by the model, so the memory column is exact.
//
// Model: byte tokens (vocab 256) -> embedding [64] + sinusoidal positions -> 2 pre-LN encoder
// layers (x + Wo·Attn(LN(x)), x + W2·GELU(W1·LN(x)); 64 dims, 2 heads of 32, FFN 128) ->
// LayerNorm -> mean pooling -> linear classifier. Weights are random (seeded) unless --weights
// gives a file; the file format is documented in examples/lra/weights.hpp.
//
// Run (from the build directory):
//   ./examples/lra_encoder --attention nystrom --landmarks 128 --lengths 1K,2K,4K,8K --batch 2
//   ./examples/lra_encoder --attention proxy --save-weights lra.bin   # then --weights lra.bin
//   ./examples/lra_encoder --help
// Columns: sequences/s over at least --min-time seconds after one warm-up pass; memory per
// sequence = the activations one forward pass holds (per token: residual, LayerNorm output,
// fused QKV, attention output, FFN hidden; per sequence: pooled vector and logits) plus the
// attention workspace (workspace_bytes), divided by the batch. Weights are shared by the batch
// and printed once. With --attention softmax the exact operator is tiled (FlashAttention-style),
// so its memory is linear in the length too; what grows quadratically is its time.
// Exit codes: 0 ok, 2 bad command line (usage is printed), 3 failed run (e.g. bad weights file).
#include <cstdio>

#include "lra/main.hpp"
#include "lra/model_cpu.hpp"

int main(int argc, char** argv) {
  return lra::main_with(
      argc, argv, "lra_encoder", [] { return 0; },
      [](const lra::Options& o, const lra::Weights& w, const std::string& setup) {
        lra::CpuEncoder model(w, o.attention, o.m, o.threads);
        std::printf("lra_encoder (CPU, %d threads): %s\n", effattn::cpu::thread_count({o.threads}), setup.c_str());
        lra::run_lengths(o, model);
      });
}

// Do trained proxy tokens make better landmarks than Nyströmformer's segment means? Proxyformer
// (AAAI 2024) claims so: fewer, less redundant landmarks for the same accuracy, helped by its
// decomposed column dropout and a contrastive loss on the proxies. This program trains shared
// proxies proxy_q, proxy_k [1, H, M, D] with effattn's training pair for Proxy<float>
// (attention_with_saved, then attention_backward_with_saved from what it kept) and a small Adam,
// to make Proxy attention match exact softmax attention, and measures the result on held-out
// inputs against Nyström and untrained proxies.
//
// Inputs: clustered token embeddings (train/proxies.hpp). Each token has a type drawn like words
// of text (Zipf frequencies over 64 types, runs of mean length 10); per head, q and k are the
// type's center plus noise (tokens attend to tokens of their own type) and v the type's value
// plus noise, scaled so that same-type logits are about 2.8 and attention is peaked. Why these
// and not the q/k/v of lra_encoder's first layer: the repository ships no trained weights, and
// with random ones (W ~ U(±1/sqrt(64))) the logits have a std of about 0.3, attention is nearly
// uniform and every approximation is close (nothing to learn, nothing to measure). Clustered
// inputs have the structure landmarks exist for, with knobs (--clusters) that say how much.
//
// Training: each step draws --batch sequences from a pool of --train-sequences (exact outputs
// computed once) and minimizes
//   J = MSE + lambda L_con,   MSE = (1/n) sum (out_proxy − out_exact)^2 over the batch (n elements),
// the MSE's gradient dout = 2 (out_proxy − out_exact) / n going through the backward (only
// dproxy_q and dproxy_k are used; dq, dk, dv are written to scratch). Column dropout, when on,
// draws a fresh dropout_seed every step; evaluation runs with column_dropout = 0, as a dropout
// layer in eval mode. Adam (train::Adam) updates both proxy sets.
//
// Contrastive term (our reading of the paper, whose formula is not public): InfoNCE over the
// cosine similarities of the proxies of one set, each proxy its own positive and the others the
// negatives. For P = {p_1..p_M} (one head, query or key side), u_i = p_i / |p_i|, S_ij = u_i·u_j:
//   L(P) = (1/M) sum_i −log( exp(S_ii/tau) / sum_j exp(S_ij/tau) ) = (1/M) sum_i [log sum_j exp(S_ij/tau) − 1/tau]
//   L_con = (1 / 2H) sum_h [ L(proxy_q[h]) + L(proxy_k[h]) ],   tau = 0.07 by default.
// Gradient, with A = softmax_row(S / tau) (S_ii = 1 is constant):
//   dL/du_i = (1 / (M tau)) sum_{j != i} (A_ij + A_ji) u_j,   dL/dp_i = (I − u_i u_iᵀ) dL/du_i / |p_i|.
// tests/cpu/train_proxies_test.cpp checks it by finite differences (train::contrastive_loss).
//
// Initializations: "rand", entries N(0, sigma^2) with sigma the std of the q entries; "seg", the
// Nyström segment means of q (proxy_q) and k (proxy_k) of the first training batch, averaged over
// its sequences, so "trained from segment means" compares directly with segment means.
//
// Report, on --eval-sequences held-out sequences: relative error |out − exact|_F / |exact|_F of
// Nyström-M (segment means of each sequence; 6 and 20 pinv iterations), uniform attention (the
// mean of v: what an approximation with no structure gets), untrained and trained proxies; the
// mean pairwise cosine similarity of the landmarks (query side / key side: the paper's
// redundancy measure); training steps per second (a step: batch copy, Proxy forward and
// backward, contrastive term, Adam). Writes PREFIX.md, PREFIX_summary.csv, PREFIX_curves.csv and,
// with matplotlib, PREFIX.png (examples/plot_train_proxies.py).
//
// Threads: 1 by default. On the shared 2-vCPU VM the landmark operators ran 10-30x slower with
// Exec threads = 2 than with 1 (OpenMP's spinning wait; OMP_WAIT_POLICY=passive restores the
// 1-thread speed), so --threads 0 or 2 is for machines with cores to spare.
//
//   train_proxies               M = 32, 300 steps, N = 512: about half a minute on 2 cores
//   train_proxies --full        M = 8..128, 800 steps: about 20 minutes (bench/results/train_proxies.md)
//   train_proxies --check ...   exits 1 unless every trained variant's training loss fell by half
//                               and its held-out error fell below its initialization's (ctest)
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <effattn/effattn.hpp>
#include <filesystem>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "train/proxies.hpp"

#ifndef TRAIN_PROXIES_PLOT_SCRIPT
#define TRAIN_PROXIES_PLOT_SCRIPT "examples/plot_train_proxies.py"
#endif

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

/// A trained variant: initialization, column dropout on/off, contrastive term on/off.
struct Variant {
  bool random_init = false, dropout = false, contrastive = false;
  std::string name() const {
    return std::string(random_init ? "rand" : "seg") + (dropout ? "+drop" : "") + (contrastive ? "+con" : "");
  }
};

bool parse_variant(const std::string& s, Variant* v) {
  std::stringstream parts(s);
  std::string part;
  if (!std::getline(parts, part, '+') || (part != "seg" && part != "rand")) return false;
  v->random_init = part == "rand";
  while (std::getline(parts, part, '+'))
    if (part == "drop" && !v->dropout)
      v->dropout = true;
    else if (part == "con" && !v->contrastive)
      v->contrastive = true;
    else
      return false;
  return true;
}

struct Options {
  std::vector<int> m = {32};
  std::vector<Variant> variants;  // empty: the default set
  int steps = 300, eval_every = 25, log_every = 0, iterations = 6, threads = 1;
  double lr = 0.05, dropout = 0.1, contrastive = 0.01, temperature = 0.07;
  int64_t n = 512, heads = 2, d = 32, batch = 4, train_sequences = 64, eval_sequences = 16;
  train::ClusterSpec clusters;
  uint64_t seed = 1;
  std::string out = "out/train_proxies";
  bool full = false, check = false, plot = true;
  std::string command;
};

const char* kUsage =
    "usage: %s [--full] [--m M1,M2,...] [--steps S] [--lr X] [--dropout P] [--contrastive W]\n"
    "          [--temperature T] [--variants V1,V2,...] [--n N] [--heads H] [--d D] [--batch B]\n"
    "          [--train-sequences S] [--eval-sequences S] [--clusters C] [--iterations I]\n"
    "          [--eval-every K] [--log-every K] [--seed S] [--threads T] [--out PREFIX] [--no-plot] [--check]\n"
    "  --m            proxies / landmarks per head (default 32; --full: 8,16,32,64,128)\n"
    "  --steps        Adam steps per variant (default 300; --full: 800); --lr, the peak of a cosine decay (default "
    "0.05)\n"
    "  --dropout P    column dropout of the +drop variants during training (default 0.1; never at eval)\n"
    "  --contrastive  weight lambda of the contrastive term of the +con variants (default 0.01)\n"
    "  --temperature  its temperature tau (default 0.07)\n"
    "  --variants     trained variants, each seg|rand (initialization) [+drop] [+con]; default\n"
    "                 seg,seg+drop,seg+con,seg+drop+con,rand\n"
    "  inputs         --n 512 tokens, --heads 2, --d 32 (head dim), --batch 4 sequences per step,\n"
    "                 pools of --train-sequences 64 and --eval-sequences 16, --clusters 64 token types\n"
    "  --iterations   Newton-Schulz steps of Proxy and Nystrom (default 6)\n"
    "  --threads T    effattn threads (default 1: a step's parallel regions are short, and on a shared\n"
    "                 2-core machine 2 spinning OpenMP threads made them ~10x slower; 0 = OpenMP's default)\n"
    "  --out PREFIX   writes PREFIX.md, PREFIX_summary.csv, PREFIX_curves.csv, PREFIX.png\n"
    "                 (default out/train_proxies; the PNG needs python3 with matplotlib)\n"
    "  --check        exit 1 unless each variant's training loss halved and its held-out error fell\n";

void usage(const char* argv0) { std::fprintf(stderr, kUsage, argv0); }

bool parse_int(const std::string& s, int64_t lo, int64_t hi, int64_t* out) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool parse_real(const std::string& s, double lo, double hi, double* out) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !std::isfinite(v) || v < lo || v > hi) return false;
  *out = v;
  return true;
}

template <class F>
bool parse_list(const std::string& s, F&& item) {
  std::stringstream list(s);
  std::string x;
  int count = 0;
  while (std::getline(list, x, ','))
    if (!item(x))
      return false;
    else
      ++count;
  return count > 0 && s.back() != ',';
}

bool parse(int argc, char** argv, Options* o) {
  bool m_given = false, steps_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    o->command += (i > 1 ? " " : "") + a;
    if (a == "--full") {
      o->full = true;
      continue;
    }
    if (a == "--check") {
      o->check = true;
      continue;
    }
    if (a == "--no-plot") {
      o->plot = false;
      continue;
    }
    if (i + 1 >= argc) return false;
    const std::string value = argv[++i];
    o->command += " " + value;
    int64_t x = 0;
    const auto integer = [&](int64_t lo, int64_t hi, auto* field) {
      if (!parse_int(value, lo, hi, &x)) return false;
      *field = static_cast<std::remove_pointer_t<decltype(field)>>(x);
      return true;
    };
    const auto real = [&](double lo, double hi, double* field) { return parse_real(value, lo, hi, field); };
    bool ok = false;
    if (a == "--m") {
      o->m.clear();
      ok = m_given = parse_list(value, [&](const std::string& s) {
        if (!parse_int(s, 1, 1024, &x)) return false;
        o->m.push_back(static_cast<int>(x));
        return true;
      });
    } else if (a == "--variants") {
      o->variants.clear();
      ok = parse_list(value, [&](const std::string& s) {
        Variant v;
        if (!parse_variant(s, &v)) return false;
        o->variants.push_back(v);
        return true;
      });
    } else if (a == "--steps") {
      ok = steps_given = integer(1, 1000000, &o->steps);
    } else if (a == "--lr") {
      ok = real(1e-9, 10, &o->lr) && o->lr > 0;
    } else if (a == "--dropout") {
      ok = real(0, 0.9, &o->dropout);
    } else if (a == "--contrastive") {
      ok = real(0, 1e6, &o->contrastive);
    } else if (a == "--temperature") {
      ok = real(1e-3, 1e3, &o->temperature);
    } else if (a == "--n") {
      ok = integer(2, 1 << 20, &o->n);
    } else if (a == "--heads") {
      ok = integer(1, 64, &o->heads);
    } else if (a == "--d") {
      ok = integer(1, 1024, &o->d);
    } else if (a == "--batch") {
      ok = integer(1, 4096, &o->batch);
    } else if (a == "--train-sequences") {
      ok = integer(1, 1 << 20, &o->train_sequences);
    } else if (a == "--eval-sequences") {
      ok = integer(1, 1 << 20, &o->eval_sequences);
    } else if (a == "--clusters") {
      ok = integer(1, 1 << 16, &o->clusters.clusters);
    } else if (a == "--iterations") {
      ok = integer(0, 100, &o->iterations);
    } else if (a == "--eval-every") {
      ok = integer(1, 1000000, &o->eval_every);
    } else if (a == "--log-every") {
      ok = integer(1, 1000000, &o->log_every);
    } else if (a == "--seed") {
      ok = integer(0, INT64_MAX, &o->seed);
    } else if (a == "--threads") {
      ok = integer(0, 1024, &o->threads);
    } else if (a == "--out") {
      o->out = value;
      ok = !value.empty();
    }
    if (!ok) return false;
  }
  if (o->full) {
    if (!m_given) o->m = {8, 16, 32, 64, 128};
    if (!steps_given) o->steps = 800;
  }
  if (o->variants.empty())
    for (const char* v : {"seg", "seg+drop", "seg+con", "seg+drop+con", "rand"}) {
      o->variants.emplace_back();
      parse_variant(v, &o->variants.back());
    }
  if (o->log_every == 0) o->log_every = std::max(1, o->steps / 6);
  return o->train_sequences >= o->batch;
}

using Tensor = effattn::Tensor<float>;
using CTensor = effattn::Tensor<const float>;

/// Sequences with their exact softmax attention: q, k [count, H, N, D], v and exact [count, H, N, D].
struct Set {
  int64_t count = 0, H = 0, N = 0, D = 0;
  std::vector<float> q, k, v, exact;
  CTensor view(const std::vector<float>& x, int64_t first = 0, int64_t n = -1) const {
    return effattn::bhsd<const float>(x.data() + first * H * N * D, n < 0 ? count : n, H, N, D);
  }
};

Set make_set(const train::ClusteredTokens& tokens, int64_t count, int64_t N, uint64_t seed,
             const effattn::Exec<effattn::Cpu>& exec) {
  Set s;
  s.count = count, s.H = tokens.heads(), s.N = N, s.D = tokens.dim();
  const size_t size = static_cast<size_t>(count * s.H * N * s.D);
  s.q.resize(size), s.k.resize(size), s.v.resize(size), s.exact.resize(size);
  std::mt19937_64 gen(seed);
  tokens.sample(gen, count, N, s.q.data(), s.k.data(), s.v.data());
  effattn::attention<effattn::Cpu>(effattn::Softmax{}, s.view(s.q), s.view(s.k), s.view(s.v),
                                   effattn::bhsd(s.exact.data(), count, s.H, N, s.D), {}, exec);
  return s;
}

/// |out − exact|_F / |exact|_F.
double relative_error(const std::vector<float>& out, const std::vector<float>& exact) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    const double e = exact[i], o = out[i];
    diff += (o - e) * (o - e);
    ref += e * e;
  }
  return std::sqrt(diff / ref);
}

/// Shared proxies: one buffer [2, H, M, D], proxy_q then proxy_k, so Adam updates both at once.
struct Proxies {
  int64_t H = 0, M = 0, D = 0;
  std::vector<float> p;
  Proxies(int64_t h, int64_t m, int64_t d) : H(h), M(m), D(d), p(static_cast<size_t>(2 * h * m * d)) {}
  float* side(int s) { return p.data() + s * H * M * D; }
  const float* side(int s) const { return p.data() + s * H * M * D; }
  CTensor view(int s) const { return effattn::bhsd<const float>(side(s), 1, H, M, D); }
  effattn::Proxy<float> method(int iterations, float dropout = 0, uint64_t seed = 0) const {
    effattn::Proxy<float> m{view(0), view(1)};
    m.pinv_iterations = iterations;
    m.column_dropout = dropout;
    m.dropout_seed = seed;
    return m;
  }
  /// Mean pairwise cosine of side s, averaged over the heads.
  double cosine(int s) const {
    double c = 0;
    for (int64_t h = 0; h < H; ++h) c += train::mean_pairwise_cosine(side(s) + h * M * D, M, D) / double(H);
    return c;
  }
};

/// What a method reaches on the held-out set.
struct Result {
  std::string method;
  int M = 0;
  double error = 0, cos_q = NAN, cos_k = NAN, steps_per_s = NAN, train_mse_first = NAN, train_mse_last = NAN;
  double init_error = NAN;  // trained variants: the held-out error of their initialization
};

struct CurvePoint {
  int M;
  std::string variant;
  int step;
  double train_mse, contrastive, heldout_error;
};

template <class Method>
double evaluate(const Method& method, const Set& eval, std::vector<float>& out,
                const effattn::Exec<effattn::Cpu>& exec) {
  out.resize(eval.exact.size());
  effattn::attention<effattn::Cpu>(method, eval.view(eval.q), eval.view(eval.k), eval.view(eval.v),
                                   effattn::bhsd(out.data(), eval.count, eval.H, eval.N, eval.D), {}, exec);
  return relative_error(out, eval.exact);
}

/// Training of one variant; returns its result and appends its curve.
class Trainer {
 public:
  Trainer(const Options& o, const Set& pool, const Set& eval, const effattn::Exec<effattn::Cpu>& exec)
      : o_(o), pool_(pool), eval_(eval), exec_(exec) {
    const size_t batch = static_cast<size_t>(o.batch * pool.H * pool.N * pool.D);
    for (auto* b : {&q_, &k_, &v_, &exact_, &out_, &dout_, &dq_, &dk_, &dv_}) b->resize(batch);
  }

  Result run(const Variant& var, Proxies proxies, double init_error, std::vector<CurvePoint>& curve) {
    const int64_t H = proxies.H, M = proxies.M, D = proxies.D;
    const float dropout = var.dropout ? static_cast<float>(o_.dropout) : 0.0f;
    const double lambda = var.contrastive ? o_.contrastive : 0.0;
    Proxies grad(H, M, D);
    train::Adam adam;
    adam.lr = o_.lr;
    Result r;
    r.method = var.name();
    r.M = static_cast<int>(M);
    r.init_error = init_error;
    r.train_mse_first = probe_mse(proxies);
    std::mt19937_64 pick(o_.seed * 7919 + 13);  // the same batches for every variant
    std::uniform_int_distribution<int64_t> sequence(0, pool_.count - 1);
    std::vector<int64_t> chosen(static_cast<size_t>(o_.batch));
    double train_time = 0, mse = NAN, con = NAN;  // none yet at step 0
    const auto started = Clock::now();
    const auto record = [&](int step) {
      const double err = evaluate(proxies.method(o_.iterations), eval_, eval_out_, exec_);
      curve.push_back({r.M, r.method, step, mse, con, err});
      return err;
    };
    record(0);
    for (int step = 1; step <= o_.steps; ++step) {
      for (auto& c : chosen) c = sequence(pick);  // drawn outside the timed step
      const auto t0 = Clock::now();
      for (int64_t b = 0; b < o_.batch; ++b) {
        const size_t len = static_cast<size_t>(H * pool_.N * D), at = static_cast<size_t>(chosen[b]) * len;
        for (auto [src, dst] : {std::pair{&pool_.q, &q_}, {&pool_.k, &k_}, {&pool_.v, &v_}, {&pool_.exact, &exact_}})
          std::copy(src->begin() + at, src->begin() + at + len, dst->begin() + b * len);
      }
      const uint64_t drop_seed = o_.seed * 1000003u + static_cast<uint64_t>(step);  // fresh mask each step
      const effattn::Proxy<float> method = proxies.method(o_.iterations, dropout, drop_seed);
      // The training forward keeps K3·V, Z with its Newton–Schulz iterates and the row statistics
      // for the backward, in a block held across steps.
      const size_t keep = effattn::saved_bytes<effattn::Cpu>(method, cview(q_), cview(k_), cview(v_));
      if (keep > saved_.bytes) {
        saved_memory_.reset(std::aligned_alloc(64, (keep + 63) / 64 * 64));
        if (!saved_memory_) throw std::bad_alloc();
        saved_ = {saved_memory_.get(), keep};
      }
      effattn::attention_with_saved<effattn::Cpu>(method, cview(q_), cview(k_), cview(v_), view(out_), saved_, {},
                                                  exec_);
      const double n = double(out_.size());
      double sq = 0;
      for (size_t i = 0; i < out_.size(); ++i) {
        const double diff = double(out_[i]) - double(exact_[i]);
        sq += diff * diff;
        dout_[i] = static_cast<float>(2 * diff / n);
      }
      mse = sq / n;
      effattn::Grads<float> g{view(dq_), view(dk_), view(dv_), effattn::bhsd(grad.side(0), 1, H, M, D),
                              effattn::bhsd(grad.side(1), 1, H, M, D)};
      effattn::attention_backward_with_saved<effattn::Cpu>(method, cview(q_), cview(k_), cview(v_), cview(out_),
                                                           cview(dout_), saved_, g, {}, exec_);
      con = lambda > 0 ? 0 : NAN;
      if (lambda > 0)
        for (int s = 0; s < 2; ++s)
          for (int64_t h = 0; h < H; ++h)
            con += train::contrastive_loss(proxies.side(s) + h * M * D, M, D, o_.temperature, grad.side(s) + h * M * D,
                                           lambda / double(2 * H), /*accumulate=*/true) /
                   double(2 * H);
      adam.lr = o_.lr * 0.5 * (1 + std::cos(M_PI * (step - 1) / o_.steps));  // cosine decay
      adam.step(proxies.p.data(), grad.p.data(), proxies.p.size());
      train_time += seconds_since(t0);
      const bool log = step % o_.log_every == 0 || step == o_.steps;
      if (log || step % o_.eval_every == 0) {
        const double err = record(step);
        if (log)
          std::fprintf(stderr,
                       "  M=%-4ld %-13s step %5d/%d  train MSE %.3e  L_con %6.3f  held-out error %.4f  %.1f steps/s\n",
                       long(M), r.method.c_str(), step, o_.steps, mse, lambda > 0 ? con : 0.0, err, step / train_time);
      }
    }
    r.error = curve.back().heldout_error;
    r.cos_q = proxies.cosine(0);
    r.cos_k = proxies.cosine(1);
    r.steps_per_s = o_.steps / train_time;
    r.train_mse_last = probe_mse(proxies);
    std::fprintf(stderr, "  M=%-4ld %-13s done in %.1f s (%.1f s training)\n", long(M), r.method.c_str(),
                 seconds_since(started), train_time);
    return r;
  }

 private:
  Tensor view(std::vector<float>& x) const { return effattn::bhsd(x.data(), o_.batch, pool_.H, pool_.N, pool_.D); }
  CTensor cview(const std::vector<float>& x) const {
    return effattn::bhsd<const float>(x.data(), o_.batch, pool_.H, pool_.N, pool_.D);
  }
  /// The training MSE on the pool's first batch, without dropout: a fixed probe of the objective.
  double probe_mse(const Proxies& p) {
    const int64_t B = o_.batch;
    effattn::attention<effattn::Cpu>(p.method(o_.iterations), pool_.view(pool_.q, 0, B), pool_.view(pool_.k, 0, B),
                                     pool_.view(pool_.v, 0, B), view(out_), {}, exec_);
    double sq = 0;
    for (size_t i = 0; i < out_.size(); ++i) sq += std::pow(double(out_[i]) - double(pool_.exact[i]), 2);
    return sq / double(out_.size());
  }

  const Options& o_;
  const Set& pool_;
  const Set& eval_;
  effattn::Exec<effattn::Cpu> exec_;
  std::unique_ptr<void, void (*)(void*)> saved_memory_{nullptr, std::free};
  effattn::Saved saved_;
  std::vector<float> q_, k_, v_, exact_, out_, dout_, dq_, dk_, dv_, eval_out_;
};

/// Proxies from the segment means of the first `batch` sequences of the pool, averaged over them.
Proxies segment_mean_proxies(const Set& pool, int64_t batch, int64_t M) {
  Proxies p(pool.H, M, pool.D);
  std::vector<double> means(static_cast<size_t>(M * pool.D));
  for (int s = 0; s < 2; ++s) {
    const std::vector<float>& x = s == 0 ? pool.q : pool.k;
    for (int64_t h = 0; h < pool.H; ++h) {
      float* dst = p.side(s) + h * M * pool.D;
      std::fill(dst, dst + M * pool.D, 0.0f);
      for (int64_t b = 0; b < batch; ++b) {
        train::segment_means(x.data() + (b * pool.H + h) * pool.N * pool.D, pool.N, pool.D, M, means.data());
        for (int64_t i = 0; i < M * pool.D; ++i) dst[i] += static_cast<float>(means[i] / double(batch));
      }
    }
  }
  return p;
}

Proxies random_proxies(const Set& pool, int64_t M, uint64_t seed) {
  double sum = 0, sq = 0;
  for (float x : pool.q) sum += x, sq += double(x) * x;
  const double n = double(pool.q.size()), sigma = std::sqrt(std::max(0.0, sq / n - (sum / n) * (sum / n)));
  Proxies p(pool.H, M, pool.D);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, sigma);
  for (float& x : p.p) x = static_cast<float>(normal(gen));
  return p;
}

/// Nyström's landmarks per held-out sequence and head: their mean pairwise cosine (side 0: q, 1: k).
double segment_mean_cosine(const Set& eval, int64_t M, int side) {
  std::vector<double> means(static_cast<size_t>(M * eval.D));
  const std::vector<float>& x = side == 0 ? eval.q : eval.k;
  double c = 0;
  for (int64_t bh = 0; bh < eval.count * eval.H; ++bh) {
    train::segment_means(x.data() + bh * eval.N * eval.D, eval.N, eval.D, M, means.data());
    c += train::mean_pairwise_cosine(means.data(), M, eval.D) / double(eval.count * eval.H);
  }
  return c;
}

/// Uniform attention: every query gets the mean of its head's values.
double uniform_error(const Set& eval) {
  std::vector<float> out(eval.exact.size());
  const int64_t N = eval.N, D = eval.D;
  for (int64_t bh = 0; bh < eval.count * eval.H; ++bh) {
    Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> v(
        eval.v.data() + bh * N * D, N, D);
    const Eigen::RowVectorXf mean = v.colwise().mean();
    for (int64_t i = 0; i < N; ++i) std::copy(mean.data(), mean.data() + D, out.begin() + bh * N * D + i * D);
  }
  return relative_error(out, eval.exact);
}

std::string today() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::localtime(&t));
  return buf;
}

/// Runs the plot script with the first python3 that has matplotlib; says so when there is none.
void plot(const std::string& prefix) {
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string probe = std::string(py) + " -c 'import matplotlib' >/dev/null 2>&1";
    if (std::system(probe.c_str()) != 0) continue;
    const std::string cmd = std::string(py) + " '" + TRAIN_PROXIES_PLOT_SCRIPT + "' '" + prefix + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "plot failed: %s\n", cmd.c_str());
    return;
  }
  std::fprintf(stderr,
               "no python3 with matplotlib, so no PNG (apt-get install python3-matplotlib, or pip install "
               "matplotlib; then python3 %s %s)\n",
               TRAIN_PROXIES_PLOT_SCRIPT, prefix.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, &o)) {
    usage(argv[0]);
    return 2;
  }
  const auto started = Clock::now();
  effattn::Exec<effattn::Cpu> exec;
  exec.threads = o.threads;
  o.clusters.clusters = std::max(1, o.clusters.clusters);
  const train::ClusteredTokens tokens(o.clusters, o.heads, o.d, o.d, o.seed);
  std::fprintf(stderr,
               "train_proxies: N = %ld, H = %ld, D = %ld, %d token types; batch %ld from %ld training sequences, %ld "
               "held out; %d steps, lr %g, dropout %g, contrastive %g (tau %g), seed %lu\n",
               long(o.n), long(o.heads), long(o.d), o.clusters.clusters, long(o.batch), long(o.train_sequences),
               long(o.eval_sequences), o.steps, o.lr, o.dropout, o.contrastive, o.temperature,
               static_cast<unsigned long>(o.seed));
  const Set pool = make_set(tokens, o.train_sequences, o.n, o.seed * 31 + 1, exec);
  const Set eval = make_set(tokens, o.eval_sequences, o.n, o.seed * 31 + 2, exec);
  std::fprintf(stderr, "  inputs and exact attention ready (%.1f s)\n", seconds_since(started));

  std::vector<Result> results;
  std::vector<CurvePoint> curve;
  std::vector<float> out;
  Trainer trainer(o, pool, eval, exec);
  const double uniform = uniform_error(eval);
  for (const int M : o.m) {
    effattn::Nystrom nystrom{M, o.iterations};
    Result ny{"nystrom", M, evaluate(nystrom, eval, out, exec), segment_mean_cosine(eval, M, 0),
              segment_mean_cosine(eval, M, 1)};
    nystrom.pinv_iterations = 20;
    Result ny20{"nystrom-20it", M, evaluate(nystrom, eval, out, exec), ny.cos_q, ny.cos_k};
    results.push_back(ny);
    results.push_back(ny20);
    results.push_back({"uniform", M, uniform});
    const Proxies seg = segment_mean_proxies(pool, o.batch, M), rnd = random_proxies(pool, M, o.seed * 17 + M);
    const double seg_error = evaluate(seg.method(o.iterations), eval, out, exec);
    const double rnd_error = evaluate(rnd.method(o.iterations), eval, out, exec);
    results.push_back({"init-seg", M, seg_error, seg.cosine(0), seg.cosine(1)});
    results.push_back({"init-rand", M, rnd_error, rnd.cosine(0), rnd.cosine(1)});
    std::fprintf(stderr,
                 "M = %d: Nystrom %.4f (20 iterations: %.4f), uniform %.4f, untrained proxies: segment means %.4f, "
                 "random %.4f\n",
                 M, ny.error, ny20.error, uniform, seg_error, rnd_error);
    for (const Variant& v : o.variants)
      results.push_back(trainer.run(v, v.random_init ? rnd : seg, v.random_init ? rnd_error : seg_error, curve));
  }

  // Files.
  const std::filesystem::path prefix(o.out);
  if (prefix.has_parent_path()) std::filesystem::create_directories(prefix.parent_path());
  const std::string md_path = o.out + ".md", summary_path = o.out + "_summary.csv", curve_path = o.out + "_curves.csv";
  FILE* md = std::fopen(md_path.c_str(), "w");
  FILE* summary = std::fopen(summary_path.c_str(), "w");
  FILE* curves = std::fopen(curve_path.c_str(), "w");
  if (md == nullptr || summary == nullptr || curves == nullptr) {
    std::fprintf(stderr, "cannot write %s, %s or %s\n", md_path.c_str(), summary_path.c_str(), curve_path.c_str());
    return 1;
  }
  std::fprintf(summary, "method,M,heldout_error,cos_q,cos_k,steps_per_s,init_error,train_mse_first,train_mse_last\n");
  for (const Result& r : results)
    std::fprintf(summary, "%s,%d,%.6e,%.6f,%.6f,%.3f,%.6e,%.6e,%.6e\n", r.method.c_str(), r.M, r.error, r.cos_q,
                 r.cos_k, r.steps_per_s, r.init_error, r.train_mse_first, r.train_mse_last);
  std::fprintf(curves, "M,variant,step,train_mse,contrastive,heldout_error\n");
  for (const CurvePoint& c : curve)
    std::fprintf(curves, "%d,%s,%d,%.6e,%.6f,%.6e\n", c.M, c.variant.c_str(), c.step, c.train_mse, c.contrastive,
                 c.heldout_error);
  std::fclose(summary);
  std::fclose(curves);

  std::vector<std::string> methods;  // in order of first appearance
  for (const Result& r : results)
    if (std::find(methods.begin(), methods.end(), r.method) == methods.end()) methods.push_back(r.method);
  const auto find = [&](const std::string& method, int M) -> const Result* {
    for (const Result& r : results)
      if (r.method == method && r.M == M) return &r;
    return nullptr;
  };
  const auto label = [](const std::string& m) -> std::string {
    if (m == "nystrom") return "Nyström, segment means of each sequence";
    if (m == "nystrom-20it") return "Nyström, 20 pinv iterations";
    if (m == "uniform") return "uniform attention (mean of v)";
    if (m == "init-seg") return "proxies = segment means (batch mean), untrained";
    if (m == "init-rand") return "proxies = random, untrained";
    return "trained: " + m;
  };
  const auto table = [&](const std::string& title, auto&& cell, bool trained_only) {
    std::string t = "\n" + title + "\n\n| method |";
    for (const int M : o.m) t += " M = " + std::to_string(M) + " |";
    t += "\n|---|";
    for (size_t i = 0; i < o.m.size(); ++i) t += "---:|";
    t += "\n";
    for (const std::string& m : methods) {
      const Result* first = find(m, o.m[0]);
      if (trained_only && std::isnan(first->steps_per_s)) continue;
      if (!trained_only && m == "uniform" && title.find("cosine") != std::string::npos) continue;
      t += "| " + label(m) + " |";
      for (const int M : o.m) t += " " + cell(*find(m, M)) + " |";
      t += "\n";
    }
    return t;
  };
  char buf[64];
  std::string report = "# Trained proxies vs segment means (train_proxies)\n\n";
  report += "Run on " + today() + ": `train_proxies" + (o.command.empty() ? "" : " " + o.command) + "` (" +
            std::to_string(int(seconds_since(started))) +
            " s). Inputs: clustered token embeddings, N = " + std::to_string(o.n) + ", H = " + std::to_string(o.heads) +
            ", D = " + std::to_string(o.d) + ", " + std::to_string(o.clusters.clusters) + " token types; " +
            std::to_string(o.steps) + " Adam steps (lr " + std::to_string(o.lr).substr(0, 6) + ") on batches of " +
            std::to_string(o.batch) + " from " + std::to_string(o.train_sequences) + " training sequences; " +
            std::to_string(o.eval_sequences) + " held-out sequences; pinv iterations " + std::to_string(o.iterations) +
            "; +drop: column dropout " + std::to_string(o.dropout).substr(0, 4) +
            " in training; +con: contrastive weight " + std::to_string(o.contrastive).substr(0, 8) + ", tau " +
            std::to_string(o.temperature).substr(0, 5) + "; seg / rand: initialized from segment means / at random.\n";
  report += table(
      "## Held-out relative error |out − exact|_F / |exact|_F",
      [&](const Result& r) {
        std::snprintf(buf, sizeof buf, "%.4f", r.error);
        return std::string(buf);
      },
      false);
  report += table(
      "## Mean pairwise cosine similarity of the landmarks (query side / key side)",
      [&](const Result& r) {
        std::snprintf(buf, sizeof buf, "%.3f / %.3f", r.cos_q, r.cos_k);
        return std::string(buf);
      },
      false);
  report += table(
      "## Training: steps per second (Proxy forward + backward + Adam, batch " + std::to_string(o.batch) +
          "); training MSE on a fixed batch, first → last",
      [&](const Result& r) {
        std::snprintf(buf, sizeof buf, "%.1f/s; %.2e → %.2e", r.steps_per_s, r.train_mse_first, r.train_mse_last);
        return std::string(buf);
      },
      true);
  std::fputs(report.c_str(), md);
  std::fclose(md);
  std::printf("%s\nwrote %s, %s and %s (%.1f s)\n", report.c_str(), md_path.c_str(), summary_path.c_str(),
              curve_path.c_str(), seconds_since(started));
  if (o.plot) plot(o.out);

  if (!o.check) return 0;
  bool ok = true;
  for (const Result& r : results) {
    if (std::isnan(r.steps_per_s)) continue;
    const bool loss_fell = r.train_mse_last <= 0.5 * r.train_mse_first, error_fell = r.error < r.init_error;
    std::printf("check M=%d %s: training MSE %.3e -> %.3e (%s), held-out error %.4f -> %.4f (%s)\n", r.M,
                r.method.c_str(), r.train_mse_first, r.train_mse_last, loss_fell ? "halved" : "NOT halved",
                r.init_error, r.error, error_fell ? "lower" : "NOT lower");
    ok = ok && loss_fell && error_fell;
  }
  std::printf("check: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

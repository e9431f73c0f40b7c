// bench::run_main's exit status, which scripts and CI read: 3 when a case failed (fail_case, as
// the benches do for an exception), 0 when a case is only skipped by design (skip_case).
// Usage: harness_status_check fail|skip; it exits with run_main's status.
#include <cstring>

#include "harness.hpp"

int main(int argc, char** argv) {
  const bool fail = argc > 1 && std::strcmp(argv[1], "fail") == 0;
  char* bench_argv0 = argv[0];
  bench::Options o;
  o.benchmark_argv.push_back(bench_argv0);
  bench::Case c;
  c.suite = "table";
  c.method = bench::MethodSpec::parse("softmax");
  c.backend = "cpu";
  c.type = "float";
  c.shape = bench::known_shapes().front();
  c.seq = 16;
  const auto make = [fail](const bench::Case&) -> std::function<void(benchmark::State&)> {
    return [fail](benchmark::State& st) {
      if (fail) bench::fail_case(st, "a failure the check injects");
      else bench::skip_case(st, "a skip the check injects");
      for (auto _ : st) {
      }
    };
  };
  return bench::run_main(o, {c}, make, benchmark::kMillisecond, false);
}

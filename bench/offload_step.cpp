// Offloaded optimizer step against its floor: max(transfer, CPU update).
//
//   offload_step [--params N] [--steps K] [--dir PATH] [--tier host|nvme|both]
//
// One rank, stage 2, bf16 parameters and gradients, AdamW, on the CPU backend (the GPU path needs
// a GPU; see bench/RESULTS.md). Reported per step (median of K after 2 warm-up steps):
//   transfer : the D2H gradient and H2D parameter copies alone (2+2 bytes per parameter) on one
//              stream, as the step issues them, with nothing else running;
//   update   : the CPU update alone (the same kernels and pool the offload engine uses) over the
//              host state, no copies;
//   step     : the whole offloaded step as a trainer sees it: grads_ready of every block (reduce,
//              gradient download during "backward") + step() (overflow check, norm, pipelined
//              update and upload, all-gather);
//   overlap  : max(transfer, update) / step; 1.0 means the copies hide completely behind the update.
// NVMe tier: bytes read and written per step, and their rate over the step, next to a plain
// sequential O_DIRECT write and read of a file of the same size in the same directory, measured
// in the same run.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "engine/plan.hpp"
#include "offload/offload_engine.hpp"
#include "bench_util.hpp"
#include "shardopt/shardopt.hpp"

using namespace shardopt;
using bench::Clock;
using bench::median;
using bench::seconds_since;

namespace {

struct Args {
  std::size_t params = std::size_t(16) << 20;
  int steps = 5;
  std::string dir = "/tmp";
  std::string tier = "both";
};

Config config(OffloadKind kind, const std::string& dir) {
  Config c;
  c.stage = 2;
  c.compute_dtype = c.reduce_dtype = DType::bf16;
  c.bucket_bytes = std::size_t(8) << 20;
  c.offload_optimizer = kind;
  c.nvme_dir = dir;
  return c;
}

// transfer alone: the copies one offloaded step makes, on one stream.
double time_transfers(std::size_t n) {
  auto be = make_cpu_backend();
  auto s = be->create_stream("bench.copy");
  Buffer dev_g = be->allocate(2 * n, Place::device, Category::gradients, "grad");
  Buffer host_g = be->allocate(2 * n, Place::pinned_host, Category::offload_staging, "grad host");
  Buffer dev_p = be->allocate(2 * n, Place::device, Category::parameters, "params");
  Buffer host_p = be->allocate(2 * n, Place::pinned_host, Category::offload_staging, "params host");
  for (Buffer* b : {&dev_g, &host_g, &dev_p, &host_p}) std::memset(b->data(), 0, b->bytes());
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = Clock::now();
    be->copy(host_g.data(), dev_g.data(), 2 * n, *s);
    const std::size_t chunk = 2 * detail::kOffloadChunk;  // uploads go cell by cell
    for (std::size_t off = 0; off < 2 * n; off += chunk)
      be->copy(dev_p.as<std::byte>() + off, host_p.as<std::byte>() + off, std::min(chunk, 2 * n - off), *s);
    be->synchronize(*s);
    if (i >= 2) t.push_back(seconds_since(t0));
  }
  return median(t);
}

// update alone: the offload engine's kernels and pool over host memory.
double time_update(std::size_t n) {
  auto pool = make_thread_pool(0);
  std::vector<float> master(n, 0.1f), m(n, 0.0f), v(n, 0.0f);
  std::vector<std::uint16_t> g(n, 0x3c00), p(n, 0);
  const cpu::Kernels& k = cpu::kernels(cpu::active_isa());
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    UpdateArgs a;
    a.rule = OptimizerKind::adamw;
    a.scalars = make_step_scalars(OptimizerKind::adamw, Hyperparams{}, i + 1, 1.0f);
    a.master = master.data();
    a.state1 = m.data();
    a.state2 = v.data();
    a.grad = g.data();
    a.grad_dtype = DType::bf16;
    a.param_out = p.data();
    a.param_dtype = DType::bf16;
    a.n = n;
    const auto t0 = Clock::now();
    for (std::size_t off = 0; off < n; off += detail::kOffloadChunk) {  // cell by cell, as the engine
      const UpdateArgs cell = cpu::slice(a, off, std::min(detail::kOffloadChunk, n - off));
      pool->parallel_for(cell.n, std::size_t(1) << 16,
                         [&](std::size_t b, std::size_t e) { k.fused_update(cpu::slice(cell, b, e - b)); });
    }
    if (i >= 2) t.push_back(seconds_since(t0));
  }
  return median(t);
}

// The offload pipeline alone, as step() runs it once the gradient is down: the CPU update of every
// cell with each cell's parameters uploaded on the copy stream while the next cell is computed.
// Returns {pipeline seconds, H2D-alone seconds}.
std::pair<double, double> time_pipeline(std::size_t n) {
  auto be = make_cpu_backend();
  const std::size_t C = detail::kOffloadChunk, cells = (n + C - 1) / C;
  Buffer master = be->allocate(4 * n, Place::pinned_host, Category::master_weights, "master");
  Buffer m = be->allocate(4 * n, Place::pinned_host, Category::optimizer_state, "m");
  Buffer v = be->allocate(4 * n, Place::pinned_host, Category::optimizer_state, "v");
  Buffer g = be->allocate(2 * n, Place::pinned_host, Category::offload_staging, "grad");
  Buffer p = be->allocate(2 * n, Place::device, Category::parameters, "params");
  std::vector<Buffer> ring;
  for (int i = 0; i < 3; ++i) ring.push_back(be->allocate(2 * C, Place::pinned_host, Category::offload_staging, "ring"));
  for (Buffer* b : {&master, &m, &v, &g, &p}) std::memset(b->data(), 0, b->bytes());
  offload::Setup st;
  st.backend = be.get();
  st.kind = OffloadKind::host;
  st.grad_dtype = st.param_dtype = DType::bf16;
  st.state_elems = n;
  st.chunk_elems = C;
  st.cells = cells;
  st.master = master.as<float>();
  st.states[0] = m.as<float>();
  st.states[1] = v.as<float>();
  st.host_grad = g.data();
  for (auto& b : ring) st.param_ring.push_back(b.data());
  offload::OffloadEngine oe(st);
  std::vector<offload::Piece> pieces;
  for (std::size_t c = 0; c < cells; ++c)
    pieces.push_back({0, c * C, std::min(C, n - c * C), p.as<std::byte>() + 2 * c * C});
  oe.set_pieces(pieces);
  std::map<int, StepScalars> scal;
  std::vector<double> t, up;
  auto s = be->create_stream("bench.up");
  for (int i = 0; i < 7; ++i) {
    scal[0] = make_step_scalars(OptimizerKind::adamw, Hyperparams{}, i + 1, 1.0f);
    auto t0 = Clock::now();
    oe.update(scal);
    be->synchronize(oe.uploaded());
    if (i >= 2) t.push_back(seconds_since(t0));
    t0 = Clock::now();  // the same uploads alone, cell by cell
    for (std::size_t c = 0; c < cells; ++c)
      be->copy(p.as<std::byte>() + 2 * c * C, ring[c % 3].data(), 2 * std::min(C, n - c * C), *s);
    be->synchronize(*s);
    if (i >= 2) up.push_back(seconds_since(t0));
  }
  return {median(t), median(up)};
}

struct StepTimes {
  double step = 0, backward = 0;
  std::size_t disk_bytes = 0;
};

StepTimes time_steps(OffloadKind kind, const Args& a) {
  auto be = make_cpu_backend();
  auto group = make_in_process_group(1);
  auto comm = make_in_process_communicator(group, 0, *be);
  Engine e(config(kind, a.dir), *be, *comm);
  for (const auto& b : bench::flat_model(a.params)) e.register_block(b);
  e.initialize();
  const int nb = static_cast<int>(e.layout().blocks().size());
  std::vector<double> t, bw;
  for (int s = 0; s < a.steps + 2; ++s) {
    const auto t0 = Clock::now();
    for (int b = nb - 1; b >= 0; --b) {  // gradients stay zero: no trainer compute in the time
      e.gradients(b);
      e.grads_ready(b);
    }
    const double backward = seconds_since(t0);
    e.step();
    if (s >= 2) t.push_back(seconds_since(t0)), bw.push_back(backward);
  }
  StepTimes r;
  r.step = median(t);
  r.backward = median(bw);
  r.disk_bytes = e.memory_report().current_total(Place::disk);
  return r;
}

// Sequential O_DIRECT write then read of `bytes` in 4 MiB requests: the disk's plain bandwidth.
std::pair<double, double> sequential_bandwidth(const std::string& dir, std::size_t bytes) {
  const std::string path = dir + "/shardopt-bench-sequential.bin";
  const std::size_t block = std::size_t(4) << 20;
  void* buf = std::aligned_alloc(4096, block);
  if (!buf) return {0, 0};
  std::memset(buf, 1, block);
  int flags = O_DIRECT;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | flags, 0600);
  if (fd < 0) {
    flags = 0;
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  }
  if (fd < 0) {
    std::free(buf);
    return {0, 0};
  }
  auto t0 = Clock::now();
  for (std::size_t off = 0; off < bytes; off += block)
    if (::pwrite(fd, buf, block, static_cast<off_t>(off)) != static_cast<ssize_t>(block)) std::perror("pwrite");
  ::fdatasync(fd);
  const double w = seconds_since(t0);
  t0 = Clock::now();
  for (std::size_t off = 0; off < bytes; off += block)
    if (::pread(fd, buf, block, static_cast<off_t>(off)) != static_cast<ssize_t>(block)) std::perror("pread");
  const double r = seconds_since(t0);
  ::close(fd);
  ::unlink(path.c_str());
  std::free(buf);
  return {bytes / w / 1e9, bytes / r / 1e9};
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--params") a.params = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "--steps") a.steps = std::max(1, std::atoi(v.c_str()));
    else if (k == "--dir") a.dir = v;
    else if (k == "--tier") a.tier = v;
    else {
      std::fprintf(stderr, "offload_step: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    const std::size_t n = a.params;
    std::printf("offload_step: %zu parameters (bf16 params/grads, fp32 master+AdamW moments: %.0f MB state), "
                "stage 2, 1 rank, CPU backend, %u hardware threads, ISA %s\n",
                n, 12.0 * n / 1e6, std::max(1u, std::thread::hardware_concurrency()),
                cpu::name_of(cpu::active_isa()));
    const double tx = time_transfers(n), up = time_update(n);
    std::printf("transfer alone (D2H grad + H2D params, %.0f MB): %8.2f ms\n", 4.0 * n / 1e6, tx * 1e3);
    std::printf("CPU update alone:                               %8.2f ms  (%.2f ns/param)\n", up * 1e3, up * 1e9 / n);
    const auto [pipe, h2d] = time_pipeline(n);
    std::printf("offload pipeline alone (update of every cell || H2D of the previous cell): %.2f ms; "
                "H2D alone %.2f ms; overlap max(H2D, update)/pipeline = %.2f\n",
                pipe * 1e3, h2d * 1e3, std::max(h2d, up) / pipe);
    std::printf("whole engine step (grads_ready of every block: reduce + D2H; then step(): overflow check, norm,\n"
                "pipelined update + H2D, all-gather), on the same 2 cores as the update:\n");
    std::printf("%-6s %12s %12s %12s %10s\n", "tier", "step ms", "of which bw", "floor ms", "overlap");
    for (OffloadKind kind : {OffloadKind::none, OffloadKind::host, OffloadKind::nvme}) {
      if (a.tier != "both" && a.tier != name_of(kind) && kind != OffloadKind::none) continue;
      const StepTimes st = time_steps(kind, a);
      if (kind == OffloadKind::none) {  // the same engine step without offload, for reference
        std::printf("%-6s %12.2f %12.2f %12s %10s\n", "none", st.step * 1e3, st.backward * 1e3, "-", "-");
        continue;
      }
      const double floor = std::max(tx, up);
      std::printf("%-6s %12.2f %12.2f %12.2f %10.2f\n", std::string(name_of(kind)).c_str(), st.step * 1e3,
                  st.backward * 1e3, floor * 1e3, floor / st.step);
      if (kind == OffloadKind::nvme) {
        const double io = 12.0 * static_cast<double>(n);  // master + 2 moments read, and written, per step
        const auto [seq_w, seq_r] = sequential_bandwidth(a.dir, st.disk_bytes / 2);
        std::printf("nvme: %.0f MB read + %.0f MB written per step: %.2f GB/s read, %.2f GB/s write over the step\n",
                    io / 1e6, io / 1e6, io / st.step / 1e9, io / st.step / 1e9);
        std::printf("nvme: sequential O_DIRECT baseline on the same dir (%.0f MB file): write %.2f GB/s, read %.2f GB/s; "
                    "serial I/O floor %.2f ms\n",
                    st.disk_bytes / 2 / 1e6, seq_w, seq_r, (io / (seq_w * 1e9) + io / (seq_r * 1e9)) * 1e3);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "offload_step: %s\n", e.what());
    return 1;
  }
  return 0;
}

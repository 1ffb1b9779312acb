#pragma once
// What the example trainers (examples/mlp, examples/gpt) share: why a rank stopped (what_of), a
// step's loss averaged over the processes of a launched job (mean_over_processes), and
// step checkpoints: the trainer's record in a checkpoint, {"next_step": N} (the steps taken, so a resumed run continues the data
// stream, the step numbers and the schedule), and the periodic checkpoints of a run as
// subdirectories "step-NNNNNN" (six or more digits: N) of one directory. Header-only, public API
// only, like the trainers themselves.
#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include "shardopt/bootstrap.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/error.hpp"

namespace shardopt_examples {

// The message of an exception, for a rank that reports why it stopped.
inline std::string what_of(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
  return "no exception";
}

// The mean of `value` over every process of a launched job (one rank each), summed in rank order
// as the in-process ranks' values are; `value` itself without a bootstrap. Collective.
inline double mean_over_processes(shardopt::Bootstrap* bootstrap, double value) {
  if (!bootstrap) return value;
  const auto all = bootstrap->all_gather_bytes(std::as_bytes(std::span<const double>(&value, 1)));
  double sum = 0;
  for (const auto& b : all) {
    double v = 0;
    std::memcpy(&v, b.data(), std::min(b.size(), sizeof v));
    sum += v;
  }
  return sum / static_cast<double>(all.size());
}

// The master values a rank owns, as records (tensor, begin, count, values...) for a launched job's
// processes to exchange: append one (read_master's callback), then gather_master_records on every
// process writes every rank's values into `master` (one vector per tensor, registration order).
inline void append_master_record(std::vector<std::byte>& out, int tensor, std::size_t begin, std::size_t count,
                                 const float* values) {
  const std::uint64_t head[3] = {static_cast<std::uint64_t>(tensor), begin, count};
  const auto* hb = reinterpret_cast<const std::byte*>(head);
  const auto* vb = reinterpret_cast<const std::byte*>(values);
  out.insert(out.end(), hb, hb + sizeof head);
  out.insert(out.end(), vb, vb + count * sizeof(float));
}

// Collective. Error(internal) naming `who` for a record that names no tensor or does not fit.
inline void gather_master_records(shardopt::Bootstrap& bootstrap, const std::vector<std::byte>& mine,
                                  std::vector<std::vector<float>>& master, const std::string& who) {
  for (const auto& rec : bootstrap.all_gather_bytes(mine)) {
    std::size_t at = 0;
    while (at + 24 <= rec.size()) {
      std::uint64_t head[3];
      std::memcpy(head, rec.data() + at, sizeof head);
      at += sizeof head;
      if (head[0] >= master.size())
        throw shardopt::Error(shardopt::ErrorCode::internal, who + ": a rank's master record names no tensor of the model");
      auto& dst = master[static_cast<std::size_t>(head[0])];
      if (head[1] > dst.size() || head[2] > dst.size() - head[1] || head[2] > (rec.size() - at) / 4)
        throw shardopt::Error(shardopt::ErrorCode::internal, who + ": a rank's master record does not fit the model");
      std::memcpy(dst.data() + head[1], rec.data() + at, head[2] * 4);
      at += head[2] * 4;
    }
  }
}

inline std::string checkpoint_record(int next_step) {
  return "{\"next_step\": " + std::to_string(next_step) + "}";
}

// 0 for a checkpoint without a record. Throws Error(invalid_argument) for a record that is not
// the trainers'.
inline int read_next_step(const std::string& record) {
  if (record.empty()) return 0;
  const std::string key = "{\"next_step\": ";
  char* end = nullptr;
  const long v = record.rfind(key, 0) == 0 ? std::strtol(record.c_str() + key.size(), &end, 10) : -1;
  if (v < 0 || v > 1000000000L || !end || std::string(end) != "}")
    throw shardopt::Error(shardopt::ErrorCode::invalid_argument,
                          "the checkpoint's trainer record '" + record +
                              "' is not the example trainers' ({\"next_step\": N})");
  return static_cast<int>(v);
}

inline std::string step_checkpoint_dir(const std::string& root, int step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%06d", step);
  return (std::filesystem::path(root) / name).string();
}

struct StepCheckpoint {
  int step = 0;
  std::string dir;
  bool complete = false;  // the manifest verifies (its own checksum) and its record names `step`
};

// Every step-NNNNNN directory of `root`, by step, ascending; none if `root` does not exist.
inline std::vector<StepCheckpoint> list_step_checkpoints(const std::string& root) {
  namespace fs = std::filesystem;
  std::vector<StepCheckpoint> out;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::string digits = name.size() > 5 ? name.substr(5) : std::string();
    if (name.rfind("step-", 0) != 0 || digits.size() < 6 || digits.size() > 9 ||
        !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    std::error_code dir_ec;
    if (!it->is_directory(dir_ec)) continue;
    StepCheckpoint c;
    c.step = std::atoi(digits.c_str());
    c.dir = it->path().string();
    try {
      c.complete = read_next_step(shardopt::inspect_checkpoint(c.dir).trainer_metadata) == c.step;
    } catch (const std::exception&) {
      c.complete = false;  // no manifest, or one that does not verify: a save that never committed
    }
    out.push_back(std::move(c));
  }
  std::sort(out.begin(), out.end(), [](const StepCheckpoint& a, const StepCheckpoint& b) { return a.step < b.step; });
  return out;
}

// Deletes the complete step checkpoints older than the newest `keep` complete ones, and the
// incomplete ones older than the newest complete one (saves that never committed). Never touches
// the newest complete one nor anything newer. Returns the directories it removed.
inline std::vector<std::string> prune_step_checkpoints(const std::string& root, int keep) {
  const std::vector<StepCheckpoint> all = list_step_checkpoints(root);
  std::vector<const StepCheckpoint*> complete;  // newest first
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (it->complete) complete.push_back(&*it);
  if (complete.empty()) return {};
  const int newest = complete.front()->step;
  std::vector<std::string> removed;
  for (std::size_t k = static_cast<std::size_t>(std::max(1, keep)); k < complete.size(); ++k)
    removed.push_back(complete[k]->dir);
  for (const StepCheckpoint& c : all)
    if (!c.complete && c.step < newest) removed.push_back(c.dir);
  for (const std::string& dir : removed) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);  // a failure leaves garbage the next prune retries
  }
  return removed;
}

// After every step whose number (steps taken) is a multiple of `every` (the run's last step
// excepted: its final save covers it), a background save into step_checkpoint_dir(root, N); one in
// flight at a time, committed (wait_save) max(1, every / 2) steps later, or before the next save
// or the run's end if sooner; after each commit, rank 0 prunes to the newest `keep`. Every rank
// calls after_step() after each step (the engine calls in it are collective); `on_started` runs on
// rank 0 once a save's directory exists (the GPT trainer writes its model_config.json there).
class PeriodicSaver {
 public:
  PeriodicSaver(int every, int keep, std::string root, int rank)
      : every_(every), keep_(keep), root_(std::move(root)), rank_(rank) {}

  template <class OnStarted>
  void after_step(shardopt::Engine& engine, int done, bool last, const OnStarted& on_started) {
    if (every_ <= 0) return;
    if (commit_at_ >= 0 && (done >= commit_at_ || last)) commit(engine);
    if (!last && done % every_ == 0) {
      if (commit_at_ >= 0) commit(engine);  // one save in flight at a time
      const std::string dir = step_checkpoint_dir(root_, done);
      engine.save_async(dir, checkpoint_record(done));
      if (rank_ == 0) on_started(dir);
      commit_at_ = done + std::max(1, every_ / 2);
    }
  }

 private:
  void commit(shardopt::Engine& engine) {
    engine.wait_save();  // collective: every rank commits the same save here
    if (rank_ == 0) (void)prune_step_checkpoints(root_, keep_);
    commit_at_ = -1;
  }
  int every_, keep_;
  std::string root_;
  int rank_;
  int commit_at_ = -1;  // the step at which the save in flight is committed (-1: none)
};

}  // namespace shardopt_examples

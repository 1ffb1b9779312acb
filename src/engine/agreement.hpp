#pragma once
// What the ranks of one engine agree on at initialize() (internal). Every rank of a communicator
// must run the same configuration on the same model (the launcher's check_agreement covers ranks
// in separate processes before any engine exists; in-process ranks, and processes whose trainer
// skipped that check, reach initialize() unchecked), and at stage 0, where every rank computes every
// element's initial value, the same initial values. A rank that fails locally before the first
// collective (a configuration it cannot plan, an NVMe directory without room) would otherwise
// leave its peers waiting in initialize()'s first collective until their timeout.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/context.hpp"
#include "shardopt/config.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/error.hpp"

namespace shardopt::detail {

// What this rank brings to an agreement: a failure found locally (empty: none), or a fingerprint
// of what must be equal on every rank.
struct RankStatus {
  std::string failure;                       // the local Error's message
  ErrorCode code = ErrorCode::invalid_argument;
  std::uint64_t fingerprint = 0;
};

// The configuration, the model and every tensor group's hyperparameters, hashed.
std::uint64_t config_fingerprint(const Config& config, const std::vector<BlockSpec>& blocks, int world,
                                 const std::map<int, Hyperparams>& hyper_by_group);

// The planned buffers of the agreement (Buf::agreement): `device` and `host`, each (world + 1)
// records. A rank that could not plan has none: agree() then allocates its own.
struct AgreementBuffers {
  Buffer device, host;
};

// Collective over ctx.comm (on ctx.side; synchronizes it). Every rank throws the same Error if any
// rank reports a failure (the lowest such rank's code and message, naming that rank) or if the
// fingerprints differ (naming `what` and the ranks that differ from rank 0). A world of one only
// rethrows its own failure.
void agree(EngineContext& ctx, const std::string& what, const RankStatus& mine, AgreementBuffers& buffers);

}  // namespace shardopt::detail

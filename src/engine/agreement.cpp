// The initialize() agreement between ranks: each rank's status travels as fp32 values (exact for
// 16-bit chunks and bytes) in one all_gather, so any communicator and backend can carry it.
#include "engine/agreement.hpp"

#include <algorithm>
#include <cstring>

#include "checkpoint/format.hpp"
#include "core/config_fields.hpp"
#include "engine/plan.hpp"
#include "shardopt/bootstrap.hpp"

namespace shardopt::detail {

namespace {

// [0] failed (0/1), [1] the error code, [2..5] the fingerprint in 16-bit chunks, [6] message
// length, then the message's bytes.
constexpr std::size_t kHeader = 7;
constexpr std::size_t kRecord = kAgreementRecordFloats;
constexpr std::size_t kMessageBytes = kRecord - kHeader;

std::uint64_t mix(std::uint64_t h, std::uint64_t v) noexcept {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

}  // namespace

std::uint64_t config_fingerprint(const Config& config, const std::vector<BlockSpec>& blocks, int world,
                                 const std::map<int, Hyperparams>& hyper_by_group) {
  // Every group's hyperparameters as the field table writes them (exact for floats), hashed.
  std::string text;
  for (const auto& [group, hp] : hyper_by_group) {
    text += "group " + std::to_string(group) + ":";
    fields::for_each_field(hp, [&](const fields::FieldInfo& f, const auto& value) {
      text += std::string(" ") + f.name + "=" + fields::to_text(value);
    });
    text += '\n';
  }
  return mix(agreement_hash(config, blocks, world), ckpt::xxh64(text.data(), text.size()));
}

void agree(EngineContext& ctx, const std::string& what, const RankStatus& mine, AgreementBuffers& buffers) {
  if (ctx.world == 1) {
    if (!mine.failure.empty()) throw Error(mine.code, mine.failure);
    return;
  }
  std::vector<float> record(kRecord, 0.0f);
  record[0] = mine.failure.empty() ? 0.0f : 1.0f;
  record[1] = static_cast<float>(static_cast<int>(mine.code));
  for (int k = 0; k < 4; ++k) record[2 + k] = static_cast<float>((mine.fingerprint >> (16 * k)) & 0xffff);
  const std::size_t n = std::min(mine.failure.size(), kMessageBytes);
  record[6] = static_cast<float>(n);
  for (std::size_t i = 0; i < n; ++i) record[kHeader + i] = static_cast<float>(static_cast<unsigned char>(mine.failure[i]));

  const std::size_t world = static_cast<std::size_t>(ctx.world);
  if (!buffers.device || !buffers.host) {  // this rank could not plan: it only has to take part
    buffers.device = ctx.be.allocate((world + 1) * kRecord * 4, Place::device, Category::other, "initialize agreement");
    buffers.host = ctx.be.allocate((world + 1) * kRecord * 4, Place::host, Category::other, "initialize agreement (host)");
  }
  Buffer& dev = buffers.device;
  Buffer& host = buffers.host;
  std::memcpy(host.data(), record.data(), kRecord * 4);
  float* send = dev.as<float>();
  float* recv = send + kRecord;
  ctx.be.copy(send, host.data(), kRecord * 4, *ctx.side);
  ctx.comm.all_gather(send, recv, kRecord, DType::fp32, *ctx.side);
  ctx.be.copy(host.as<float>() + kRecord, recv, world * kRecord * 4, *ctx.side);
  ctx.be.synchronize(*ctx.side);
  const float* all = host.as<float>() + kRecord;

  auto at = [&](std::size_t q) { return all + q * kRecord; };
  for (std::size_t q = 0; q < world; ++q) {
    const float* r = at(q);
    if (r[0] == 0.0f) continue;
    const std::size_t len = std::min(kMessageBytes, static_cast<std::size_t>(r[6]));
    std::string message(len, '\0');
    for (std::size_t i = 0; i < len; ++i) message[i] = static_cast<char>(static_cast<unsigned char>(r[kHeader + i]));
    const std::string prefix = static_cast<int>(q) == ctx.rank ? "" : "rank " + std::to_string(q) + " failed in " + what + ": ";
    const int code = static_cast<int>(r[1]);
    throw Error(code >= 0 && code <= static_cast<int>(ErrorCode::internal) ? static_cast<ErrorCode>(code) : ErrorCode::internal,
                prefix + message);
  }
  auto fingerprint = [&](std::size_t q) {
    std::uint64_t f = 0;
    for (int k = 0; k < 4; ++k) f |= static_cast<std::uint64_t>(at(q)[2 + k]) << (16 * k);
    return f;
  };
  std::string differ;
  for (std::size_t q = 1; q < world; ++q)
    if (fingerprint(q) != fingerprint(0)) differ += (differ.empty() ? "" : ", ") + std::to_string(q);
  if (!differ.empty())
    throw Error(ErrorCode::communication, what + ": ranks disagree: rank(s) " + differ + " differ from rank 0 (seen by rank " +
                                                 std::to_string(ctx.rank) + ")");
}

}  // namespace shardopt::detail

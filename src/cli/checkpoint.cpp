// shardopt checkpoint inspect DIR | export DIR --out FILE.safetensors [--dtype]
#include <sstream>

#include "commands.hpp"
#include "shardopt/checkpoint.hpp"
#include "units.hpp"

namespace shardopt::cli {

CheckpointCommands add_checkpoint(CLI::App& app, CheckpointArgs& a) {
  CLI::App* ck = app.add_subcommand("checkpoint", "Inspect a checkpoint or export it to safetensors");
  ck->require_subcommand(1);
  CheckpointCommands c;
  c.inspect = ck->add_subcommand("inspect", "Print a checkpoint's manifest summary (and verify its checksums)");
  c.inspect->add_option("dir", a.dir, "checkpoint directory")->required();
  c.inspect->add_flag("--verify", a.verify, "also read every shard file and check every checksum");
  c.inspect->add_flag("--json", a.json, "print one JSON object");
  c.exporter = ck->add_subcommand("export", "Write the master weights as one .safetensors file (streaming); a GPT "
                                            "checkpoint as a Hugging Face model directory");
  c.exporter->add_option("dir", a.dir, "checkpoint directory")->required();
  c.exporter->add_option("--out", a.out,
                         "output .safetensors file; for a GPT checkpoint, a directory (model.safetensors and "
                         "config.json) unless it ends in .safetensors")->required();
  c.exporter->add_option("--dtype", a.dtype, "element type of the exported tensors")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))->capture_default_str();
  return c;
}

int run_checkpoint_inspect(const CheckpointArgs& a, Io& io) {
  const CheckpointInfo i = inspect_checkpoint(a.dir);
  if (a.verify) verify_checkpoint(a.dir);
  if (a.json) {
    Json j;
    j["dir"] = i.dir;
    j["format_version"] = i.format_version;
    j["library_version"] = i.library_version;
    j["generation"] = i.generation;
    j["world_size"] = i.world_size;
    j["stage"] = i.stage;
    j["compute_dtype"] = std::string(name_of(i.compute_dtype));
    j["optimizer"] = std::string(name_of(i.optimizer));
    j["fields"] = i.fields;
    j["state_precision"] = std::string(name_of(i.state_precision));
    if (i.state_precision == StatePrecision::int8) j["quant_block"] = i.quant_block;
    j["step"] = i.step;
    j["loss_scale"] = i.loss_scale;
    j["tensors"] = i.tensors.size();
    j["params"] = i.total_numel;
    j["files"] = i.files;
    j["bytes"] = i.bytes;
    if (a.verify) j["verified"] = true;
    io.out << j.dump() << '\n';
    return 0;
  }
  io.out << "checkpoint " << i.dir << " (format " << i.format_version << ", shardopt " << i.library_version
         << ", generation " << i.generation << ")\n"
         << "  saved by " << i.world_size << " ranks at stage " << i.stage << ", compute " << name_of(i.compute_dtype)
         << ", optimizer " << name_of(i.optimizer)
         << (i.state_precision == StatePrecision::fp32
                 ? std::string()
                 : " (" + std::string(name_of(i.state_precision)) + " state" +
                       (i.state_precision == StatePrecision::int8 ? ", blocks of " + std::to_string(i.quant_block) : "") + ")")
         << ", step " << i.step << ", loss scale " << i.loss_scale << "\n"
         << "  " << i.tensors.size() << " tensors, " << format_count(i.total_numel) << " params, fields:";
  for (const auto& f : i.fields) io.out << ' ' << f;
  io.out << "\n  " << i.files << " shard files, " << format_bytes(double(i.bytes)) << "\n";
  for (const auto& t : i.tensors) {
    std::ostringstream shape;
    shape << '[';
    for (std::size_t k = 0; k < t.shape.size(); ++k) shape << (k ? "," : "") << t.shape[k];
    shape << ']';
    io.out << "  " << t.name << ' ' << shape.str() << " group " << t.group << '\n';
  }
  if (a.verify) io.out << "  verified: every checksum matches\n";
  return 0;
}

int run_checkpoint_export(const CheckpointArgs& a, Io& io) {
  DType dt = DType::fp32;
  if (!parse_dtype(a.dtype, dt)) throw UsageError("--dtype: unknown dtype '" + a.dtype + "'");
  const std::string ext = ".safetensors";
  const bool file = a.out.size() >= ext.size() && a.out.compare(a.out.size() - ext.size(), ext.size(), ext) == 0;
  if (!file && is_gpt_checkpoint(a.dir)) return run_gpt_export(a.dir, a.out, dt, io);
  export_safetensors(a.dir, a.out, dt);
  io.out << "wrote " << a.out << " (" << a.dtype << ")\n";
  return 0;
}

}  // namespace shardopt::cli

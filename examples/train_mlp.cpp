// The example trainer as a standalone program: residual MLP blocks learning a fixed teacher over
// N in-process ranks (see mlp/mlp.hpp). `shardopt train` is the same trainer with every option;
// this file shows how little a program needs around it.
//
//   shardopt_train_mlp [--ranks 4] [--stage 3] [--steps 60] [--layers 4] [--hidden 128]
//                      [--batch 32] [--dtype bf16] [--lr 1e-3] [--seed 1]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mlp.hpp"

int main(int argc, char** argv) {
  mlp::TrainOptions o;
  o.config.stage = 3;
  o.config.optimizer = shardopt::OptimizerKind::adamw;
  o.config.hyper.lr = 1e-3f;
  o.config.bucket_bytes = std::size_t(256) << 10;  // a few units even for this small model
  o.steps = 60;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--ranks") o.ranks = std::atoi(v);
    else if (k == "--stage") o.config.stage = std::atoi(v);
    else if (k == "--steps") o.steps = std::atoi(v);
    else if (k == "--layers") o.shape.layers = std::atoi(v);
    else if (k == "--hidden") o.shape.hidden = std::atoi(v);
    else if (k == "--batch") o.batch = std::atoi(v);
    else if (k == "--lr") o.config.hyper.lr = std::strtof(v, nullptr);
    else if (k == "--seed") o.seed = std::strtoull(v, nullptr, 10);
    else if (k == "--dtype") {
      if (!shardopt::parse_dtype(v, o.config.compute_dtype)) {
        std::fprintf(stderr, "--dtype: unknown dtype '%s' (fp32, bf16, fp16)\n", v);
        return 2;
      }
      o.config.reduce_dtype = o.config.compute_dtype;
      if (o.config.compute_dtype == shardopt::DType::fp16)
        o.config.loss_scaling.mode = shardopt::LossScaleMode::dynamic;
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    const int every = o.steps >= 10 ? o.steps / 10 : 1;
    const mlp::TrainResult r = mlp::train(o, [&](const mlp::StepRecord& s) {
      if (s.step % every == 0 || s.step == 1)
        std::printf("step %4d  loss %.6f  %.2f ms\n", s.step, s.loss, s.step_ms);
    });
    std::printf("%zu params, stage %d, %d ranks: loss %.6f -> %.6f, digest %016llx\n", r.params,
                o.config.stage, o.ranks, r.steps.front().loss, r.steps.back().loss,
                static_cast<unsigned long long>(mlp::digest(r.master)));
    std::printf("rank 0 memory:\n%s", r.memory[0].to_string().c_str());
    return 0;
  } catch (const shardopt::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.message().c_str());
    return 1;
  }
}

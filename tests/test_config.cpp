// Config::validate() and the name/parse functions. Each invalid case changes one field of an
// otherwise valid config and expects an Error that names that field and shows its value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "checkpoint/format.hpp"
#include "core/config_fields.hpp"
#include "shardopt/config.hpp"
#include "shardopt/error.hpp"

namespace {

using shardopt::Config;
using shardopt::DType;
using shardopt::Error;
using shardopt::ErrorCode;
using shardopt::LossScaleMode;
using shardopt::OffloadKind;
using shardopt::OptimizerKind;
using shardopt::StatePrecision;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Case {
  std::string what;                  // for the failure message
  std::function<void(Config&)> set;  // breaks one field
  std::string field;                 // must appear in the message
  std::string value;                 // must appear in the message ("" to skip)
  ErrorCode code = ErrorCode::invalid_argument;
};

void expect_invalid(const Case& c) {
  SCOPED_TRACE(c.what);
  Config cfg;
  c.set(cfg);
  try {
    cfg.validate();
    ADD_FAILURE() << "validate() accepted: " << c.what;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), c.code) << e.what();
    EXPECT_NE(e.message().find(c.field), std::string::npos) << "field '" << c.field << "' not named: " << e.message();
    if (!c.value.empty()) {
      EXPECT_NE(e.message().find(c.value), std::string::npos) << "value '" << c.value << "' not shown: " << e.message();
    }
  }
}

void expect_valid(const std::string& what, const std::function<void(Config&)>& set) {
  Config cfg;
  set(cfg);
  EXPECT_NO_THROW(cfg.validate()) << what;
}

TEST(Config, DefaultsValidate) {
  const Config cfg;
  EXPECT_NO_THROW(cfg.validate());
}

TEST(Config, EveryErrorNamesItsField) {
  const std::vector<Case> cases = {
      {"stage -1", [](Config& c) { c.stage = -1; }, "stage", "-1"},
      {"stage 4", [](Config& c) { c.stage = 4; }, "stage", "4"},
      {"bucket_bytes 0", [](Config& c) { c.bucket_bytes = 0; }, "bucket_bytes", "0"},
      {"bucket_bytes below one bf16 element",
       [](Config& c) {
         c.compute_dtype = DType::bf16;
         c.bucket_bytes = 1;
       },
       "bucket_bytes", "1"},
      {"alignment 0", [](Config& c) { c.alignment = 0; }, "alignment", "0"},
      {"master bf16", [](Config& c) { c.master_dtype = DType::bf16; }, "master_dtype", "bf16", ErrorCode::unsupported},
      {"master fp16", [](Config& c) { c.master_dtype = DType::fp16; }, "master_dtype", "fp16", ErrorCode::unsupported},
      {"reduce fp16 with bf16 compute",
       [](Config& c) {
         c.compute_dtype = DType::bf16;
         c.reduce_dtype = DType::fp16;
       },
       "reduce_dtype", "fp16", ErrorCode::unsupported},
      {"reduce bf16 with fp16 compute",
       [](Config& c) {
         c.compute_dtype = DType::fp16;
         c.reduce_dtype = DType::bf16;
       },
       "reduce_dtype", "bf16", ErrorCode::unsupported},
      {"reduce bf16 with fp32 compute", [](Config& c) { c.reduce_dtype = DType::bf16; }, "reduce_dtype", "bf16",
       ErrorCode::unsupported},
      {"compute dtype out of enum", [](Config& c) { c.compute_dtype = static_cast<DType>(9); }, "compute_dtype", "9"},
      {"accumulation_steps 0", [](Config& c) { c.accumulation_steps = 0; }, "accumulation_steps", "0"},
      {"accumulation_steps -2", [](Config& c) { c.accumulation_steps = -2; }, "accumulation_steps", "-2"},
      {"max_grad_norm -1", [](Config& c) { c.max_grad_norm = -1.0f; }, "max_grad_norm", "-1"},
      {"max_grad_norm NaN", [](Config& c) { c.max_grad_norm = kNaN; }, "max_grad_norm", "nan"},
      {"max_grad_norm inf", [](Config& c) { c.max_grad_norm = kInf; }, "max_grad_norm", "inf"},
      {"lr negative", [](Config& c) { c.hyper.lr = -0.5f; }, "hyper.lr", "-0.5"},
      {"lr NaN", [](Config& c) { c.hyper.lr = kNaN; }, "hyper.lr", "nan"},
      {"lr inf", [](Config& c) { c.hyper.lr = kInf; }, "hyper.lr", "inf"},
      {"weight_decay NaN", [](Config& c) { c.hyper.weight_decay = kNaN; }, "hyper.weight_decay", "nan"},
      {"beta1 1", [](Config& c) { c.hyper.beta1 = 1.0f; }, "hyper.beta1", "1"},
      {"beta1 -0.1", [](Config& c) { c.hyper.beta1 = -0.1f; }, "hyper.beta1", "-0.1"},
      {"beta2 1", [](Config& c) { c.hyper.beta2 = 1.0f; }, "hyper.beta2", "1"},
      {"beta2 NaN", [](Config& c) { c.hyper.beta2 = kNaN; }, "hyper.beta2", "nan"},
      {"lion beta1 1.5",
       [](Config& c) {
         c.optimizer = OptimizerKind::lion;
         c.hyper.beta1 = 1.5f;
       },
       "hyper.beta1", "1.5"},
      {"adamw eps 0", [](Config& c) { c.hyper.eps = 0.0f; }, "hyper.eps", "0"},
      {"adam eps -1e-8",
       [](Config& c) {
         c.optimizer = OptimizerKind::adam;
         c.hyper.eps = -1e-8f;
       },
       "hyper.eps", "-1e-08"},
      {"sgd momentum -1",
       [](Config& c) {
         c.optimizer = OptimizerKind::sgd;
         c.hyper.momentum = -1.0f;
       },
       "hyper.momentum", "-1"},
      {"sgd dampening 2",
       [](Config& c) {
         c.optimizer = OptimizerKind::sgd;
         c.hyper.dampening = 2.0f;
       },
       "hyper.dampening", "2"},
      {"sgd nesterov with dampening",
       [](Config& c) {
         c.optimizer = OptimizerKind::sgd;
         c.hyper.nesterov = true;
         c.hyper.dampening = 0.5f;
       },
       "hyper.dampening", "0.5"},
      {"sgd nesterov without momentum",
       [](Config& c) {
         c.optimizer = OptimizerKind::sgd;
         c.hyper.nesterov = true;
         c.hyper.momentum = 0.0f;
       },
       "hyper.momentum", "0"},
      {"optimizer out of enum", [](Config& c) { c.optimizer = static_cast<OptimizerKind>(7); }, "optimizer", "7"},
      {"initial_scale 0",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.initial_scale = 0.0f;
       },
       "loss_scaling.initial_scale", "0"},
      {"fixed initial_scale -4",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::fixed;
         c.loss_scaling.initial_scale = -4.0f;
       },
       "loss_scaling.initial_scale", "-4"},
      {"initial_scale inf",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.initial_scale = kInf;
       },
       "loss_scaling.initial_scale", "inf"},
      {"growth_factor 0.5",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.growth_factor = 0.5f;
       },
       "loss_scaling.growth_factor", "0.5"},
      {"backoff 0",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.backoff = 0.0f;
       },
       "loss_scaling.backoff", "0"},
      {"backoff 1.5",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.backoff = 1.5f;
       },
       "loss_scaling.backoff", "1.5"},
      {"growth_interval 0",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.growth_interval = 0;
       },
       "loss_scaling.growth_interval", "0"},
      {"hysteresis 0",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.hysteresis = 0;
       },
       "loss_scaling.hysteresis", "0"},
      {"min_scale 0",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.min_scale = 0.0f;
       },
       "loss_scaling.min_scale", "0"},
      {"min_scale -1",
       [](Config& c) {
         c.loss_scaling.mode = LossScaleMode::dynamic;
         c.loss_scaling.min_scale = -1.0f;
       },
       "loss_scaling.min_scale", "-1"},
      {"loss scale mode out of enum", [](Config& c) { c.loss_scaling.mode = static_cast<LossScaleMode>(5); },
       "loss_scaling.mode", "5"},
      {"nvme without dir", [](Config& c) { c.offload_optimizer = OffloadKind::nvme; }, "nvme_dir", ""},
      {"offload_params at stage 2",
       [](Config& c) {
         c.stage = 2;
         c.offload_params = true;
       },
       "offload_params", "stage"},
      {"offload_params at stage 0", [](Config& c) { c.offload_params = true; }, "offload_params", ""},
      {"offload kind out of enum", [](Config& c) { c.offload_optimizer = static_cast<OffloadKind>(3); },
       "offload_optimizer", "3"},
      {"prefetch_units -1", [](Config& c) { c.prefetch_units = -1; }, "prefetch_units", "-1"},
      {"prefetch_units 1e9", [](Config& c) { c.prefetch_units = 1000000000; }, "prefetch_units", "at most 64"},
      {"gradient_buckets -1", [](Config& c) { c.gradient_buckets = -1; }, "gradient_buckets", "-1"},
      {"gradient_buckets 65", [](Config& c) { c.gradient_buckets = 65; }, "gradient_buckets", "1..64"},
  };
  for (const Case& c : cases) expect_invalid(c);
}

TEST(Config, UnusualButValid) {
  expect_valid("every stage", [](Config& c) { c.stage = 3; });
  for (int s = 0; s <= 3; ++s) expect_valid("stage " + std::to_string(s), [s](Config& c) { c.stage = s; });
  expect_valid("dynamic loss scaling with fp32 compute", [](Config& c) { c.loss_scaling.mode = LossScaleMode::dynamic; });
  expect_valid("fp16 everywhere but the master", [](Config& c) {
    c.compute_dtype = DType::fp16;
    c.reduce_dtype = DType::fp16;
    c.loss_scaling.mode = LossScaleMode::dynamic;
  });
  expect_valid("bf16 compute, fp32 reduce", [](Config& c) { c.compute_dtype = DType::bf16; });
  expect_valid("bf16 compute, bf16 reduce", [](Config& c) {
    c.compute_dtype = DType::bf16;
    c.reduce_dtype = DType::bf16;
  });
  expect_valid("lr 0", [](Config& c) { c.hyper.lr = 0.0f; });
  expect_valid("betas 0", [](Config& c) {
    c.hyper.beta1 = 0.0f;
    c.hyper.beta2 = 0.0f;
  });
  expect_valid("growth factor 1, backoff 1", [](Config& c) {
    c.loss_scaling.mode = LossScaleMode::dynamic;
    c.loss_scaling.growth_factor = 1.0f;
    c.loss_scaling.backoff = 1.0f;
  });
  // Fields a rule does not read are not checked.
  expect_valid("sgd ignores betas and eps", [](Config& c) {
    c.optimizer = OptimizerKind::sgd;
    c.hyper.beta1 = 5.0f;
    c.hyper.eps = 0.0f;
  });
  expect_valid("lion ignores eps", [](Config& c) {
    c.optimizer = OptimizerKind::lion;
    c.hyper.eps = 0.0f;
  });
  expect_valid("adamw ignores momentum", [](Config& c) { c.hyper.momentum = -3.0f; });
  expect_valid("sgd nesterov", [](Config& c) {
    c.optimizer = OptimizerKind::sgd;
    c.hyper.nesterov = true;
  });
  expect_valid("loss scaling fields unused with mode none", [](Config& c) { c.loss_scaling.backoff = 7.0f; });
  expect_valid("nvme with dir", [](Config& c) {
    c.offload_optimizer = OffloadKind::nvme;
    c.nvme_dir = "/tmp/x";
  });
  expect_valid("host offload", [](Config& c) { c.offload_optimizer = OffloadKind::host; });
  expect_valid("offload_params at stage 3", [](Config& c) {
    c.stage = 3;
    c.offload_params = true;
  });
  expect_valid("prefetch 0", [](Config& c) { c.prefetch_units = 0; });
  expect_valid("prefetch 64", [](Config& c) { c.prefetch_units = shardopt::kMaxPrefetchUnits; });
  expect_valid("gradient_buckets 0 (one per unit)", [](Config& c) { c.gradient_buckets = 0; });
  expect_valid("gradient_buckets 64", [](Config& c) { c.gradient_buckets = shardopt::kMaxGradientBuckets; });
  expect_valid("max_grad_norm 1", [](Config& c) { c.max_grad_norm = 1.0f; });
  expect_valid("alignment 1, bucket 2 bytes, fp16", [](Config& c) {
    c.alignment = 1;
    c.bucket_bytes = 2;
    c.compute_dtype = DType::fp16;
  });
}

TEST(Config, OptimizerNames) {
  const std::pair<const char*, OptimizerKind> names[] = {
      {"adamw", OptimizerKind::adamw}, {"adam", OptimizerKind::adam}, {"sgd", OptimizerKind::sgd}, {"lion", OptimizerKind::lion}};
  for (const auto& [text, kind] : names) {
    EXPECT_EQ(shardopt::name_of(kind), text);
    OptimizerKind out = kind == OptimizerKind::sgd ? OptimizerKind::lion : OptimizerKind::sgd;
    ASSERT_TRUE(shardopt::parse_optimizer(text, out)) << text;
    EXPECT_EQ(out, kind) << text;
  }
  OptimizerKind out = OptimizerKind::lion;
  for (const char* bad : {"", "AdamW", "adam_w", "adamww", "sgdm", "lamb", " adam"}) {
    EXPECT_FALSE(shardopt::parse_optimizer(bad, out)) << bad;
    EXPECT_EQ(out, OptimizerKind::lion) << "output changed by a failed parse of " << bad;
  }
  EXPECT_EQ(shardopt::state_count(OptimizerKind::adamw), 2);
  EXPECT_EQ(shardopt::state_count(OptimizerKind::sgd), 1);
}

TEST(Config, OffloadNames) {
  EXPECT_EQ(shardopt::name_of(OffloadKind::none), "none");
  EXPECT_EQ(shardopt::name_of(OffloadKind::host), "host");
  EXPECT_EQ(shardopt::name_of(OffloadKind::nvme), "nvme");
}

// ---- the field tables (core/config_fields.hpp): every Config field is reachable by its key.

// A value's text, and a different valid value's text, written here independently of the parser.
std::string text_of(float v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", static_cast<double>(v));
  return b;
}
std::string text_of(int v) { return std::to_string(v); }
std::string text_of(std::int64_t v) { return std::to_string(v); }
std::string text_of(std::size_t v) { return std::to_string(v); }
std::string text_of(bool v) { return v ? "true" : "false"; }
std::string text_of(const std::string& v) { return v; }
template <class E>
  requires std::is_enum_v<E>
std::string text_of(E v) {
  return std::string(shardopt::name_of(v));
}
std::string other_text(float v) { return text_of(v * 0.5f + 0.25f); }
std::string other_text(int v) { return text_of(v + 3); }
std::string other_text(std::int64_t v) { return text_of(v + 5); }
std::string other_text(std::size_t v) { return text_of(v + 7); }
std::string other_text(bool v) { return text_of(!v); }
std::string other_text(const std::string& v) { return v + "/elsewhere"; }
std::string other_text(DType v) { return v == DType::bf16 ? "fp16" : "bf16"; }
std::string other_text(OptimizerKind v) { return v == OptimizerKind::lion ? "sgd" : "lion"; }
std::string other_text(shardopt::LrSchedule v) { return v == shardopt::LrSchedule::cosine ? "linear" : "cosine"; }
std::string other_text(LossScaleMode v) { return v == LossScaleMode::dynamic ? "fixed" : "dynamic"; }
std::string other_text(OffloadKind v) { return v == OffloadKind::host ? "nvme" : "host"; }
std::string other_text(StatePrecision v) { return v == StatePrecision::int8 ? "bf16" : "int8"; }

// key -> value as text, for every leaf field.
template <class S>
std::map<std::string, std::string> texts(const S& obj) {
  std::map<std::string, std::string> out;
  shardopt::fields::for_each_field(obj, [&](const shardopt::fields::FieldInfo& info, const auto& v) {
    EXPECT_TRUE(out.emplace(info.name, text_of(v)).second) << "two fields are named " << info.name;
  });
  return out;
}

TEST(ConfigFields, EveryKeySetsItsFieldAndNoOther) {
  const Config base;
  std::map<std::string, std::string> want;  // key -> a different value
  shardopt::fields::for_each_field(base, [&](const shardopt::fields::FieldInfo& info, const auto& v) {
    want[info.name] = other_text(v);
  });
  // Config's members plus its nested structs' members: 20 - 2 + 12 + 7.
  EXPECT_EQ(want.size(), 37u);
  const auto before = texts(base);
  for (const auto& [key, text] : want) {
    Config c;
    ASSERT_TRUE(shardopt::fields::set_field(c, key, text)) << key;
    const auto after = texts(c);
    for (const auto& [k, v] : after) {
      if (k == key) EXPECT_EQ(v, text) << key << " was not set to " << text;
      else EXPECT_EQ(v, before.at(k)) << "setting " << key << " changed " << k;
    }
  }
  for (const char* key : {"lr", "beta2", "min_lr", "warmup_steps", "schedule", "nesterov"}) {
    shardopt::Hyperparams h;
    EXPECT_TRUE(shardopt::fields::set_field(h, key, want.at(key))) << key;
    EXPECT_EQ(texts(h).at(key), want.at(key)) << key;
  }
}

TEST(ConfigFields, BadKeysAndValuesChangeNothing) {
  Config c;
  const auto before = texts(c);
  EXPECT_FALSE(shardopt::fields::set_field(c, "learning_rate", "0.1"));
  EXPECT_FALSE(shardopt::fields::set_field(c, "hyper", "0.1")) << "a nested struct is not a key";
  const std::pair<const char*, const char*> bad[] = {
      {"lr", "fast"},       {"lr", "nan"},          {"lr", "1e99"},         {"lr", ""},
      {"stage", "1.5"},     {"stage", "99999999999"}, {"bucket_bytes", "-1"}, {"nesterov", "yes"},
      {"compute_dtype", "fp64"}, {"schedule", "step"}, {"optimizer", "adagrad"}, {"warmup_steps", "3x"}};
  for (const auto& [key, text] : bad) {
    try {
      shardopt::fields::set_field(c, key, text);
      ADD_FAILURE() << key << "=" << text << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find(key), std::string::npos) << e.message();
      EXPECT_NE(e.message().find("'" + std::string(text) + "'"), std::string::npos) << e.message();
    }
  }
  EXPECT_EQ(texts(c), before);
}

// to_text is parse_value's inverse for every field, at the defaults and at other values.
TEST(ConfigFields, TextRoundTrips) {
  Config changed;
  shardopt::fields::for_each_field(changed, [&](const shardopt::fields::FieldInfo& info, auto& v) {
    ASSERT_TRUE(shardopt::fields::set_field(changed, info.name, other_text(v))) << info.name;
  });
  for (const Config& c : {Config{}, changed}) {
    Config back;
    shardopt::fields::for_each_field(c, [&](const shardopt::fields::FieldInfo& info, const auto& v) {
      ASSERT_TRUE(shardopt::fields::set_field(back, info.name, shardopt::fields::to_text(v))) << info.name;
    });
    EXPECT_EQ(texts(back), texts(c));
  }
  EXPECT_NE(texts(changed), texts(Config{}));
  EXPECT_EQ(shardopt::fields::to_text(0.1f), "0.100000001");
  EXPECT_EQ(shardopt::fields::to_text(shardopt::LrSchedule::inverse_sqrt), "inverse-sqrt");
}

// The manifest stores every Hyperparams field and reads back the same bits.
TEST(ConfigFields, ManifestKeepsEveryHyperparameter) {
  namespace ckpt = shardopt::ckpt;
  shardopt::Hyperparams h;
  shardopt::fields::for_each_field(h, [&](const shardopt::fields::FieldInfo& info, auto& v) {
    ASSERT_TRUE(shardopt::fields::set_field(h, info.name, other_text(v))) << info.name;
  });
  ckpt::Manifest m;
  m.library_version = "test";
  m.fields = ckpt::field_names(m.optimizer);
  m.chunk = 64;
  m.groups[0] = shardopt::Hyperparams{};
  m.groups[3] = h;
  const ckpt::Manifest back = ckpt::parse_manifest(ckpt::dump_manifest(m), "test manifest");
  ASSERT_EQ(back.groups.size(), 2u);
  EXPECT_EQ(texts(back.groups.at(0)), texts(shardopt::Hyperparams{}));
  EXPECT_EQ(texts(back.groups.at(3)), texts(h));
  EXPECT_NE(texts(h), texts(shardopt::Hyperparams{})) << "the test changed nothing";
}

}  // namespace

// Optimizer rules through the CPU fused-update kernels:
//  - each rule against an independent float64 implementation of its algorithm, element by element,
//    with a running rounding-error bound derived per element (see ErrorModel);
//  - the 16-bit parameter copy is exactly the round-to-nearest of the fp32 master;
//  - every instruction set gives the same bits as the scalar path and as a plain loop over the
//    header's rule functions;
//  - make_step_scalars against the double formulas, and the error cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.hpp"
#include "kernel_test_util.hpp"
#include "shardopt/error.hpp"
#include "shardopt/rules.hpp"

namespace shardopt {
namespace {

using cpu::Isa;
using testing::available_isas;
using testing::bits;
using testing::decode;
using testing::expected_to16;
using testing::format_of;
using testing::Guarded;

constexpr double kU = 0x1p-24;  // unit roundoff of fp32: |fl(x op y) - (x op y)| <= kU * |result|

// ---- make_step_scalars ---------------------------------------------------------------------------

// |got - want| within one rounding to float of `want`.
void expect_rounded(float got, double want, const char* what) {
  EXPECT_LE(std::fabs(static_cast<double>(got) - want), std::fabs(want) * kU * 1.0000001) << what;
}

TEST(StepScalars, AdamFormulas) {
  Hyperparams h;
  h.lr = 3e-4f;
  h.beta1 = 0.9f;
  h.beta2 = 0.95f;
  h.eps = 1e-6f;
  h.weight_decay = 0.1f;
  for (OptimizerKind k : {OptimizerKind::adamw, OptimizerKind::adam}) {
    for (std::int64_t t : {1, 2, 10, 1000, 1000000000}) {
      const StepScalars s = make_step_scalars(k, h, t, 0.125f);
      const double b1 = h.beta1, b2 = h.beta2;
      expect_rounded(s.bias_correction1, 1.0 / (1.0 - std::pow(b1, static_cast<double>(t))), "bc1");
      expect_rounded(s.bias_correction2_sqrt, 1.0 / std::sqrt(1.0 - std::pow(b2, static_cast<double>(t))), "bc2");
      expect_rounded(s.one_minus_beta1, 1.0 - b1, "1-b1");
      expect_rounded(s.one_minus_beta2, 1.0 - b2, "1-b2");
      EXPECT_EQ(s.lr, h.lr);
      EXPECT_EQ(s.beta1, h.beta1);
      EXPECT_EQ(s.beta2, h.beta2);
      EXPECT_EQ(s.eps, h.eps);
      EXPECT_EQ(s.weight_decay, h.weight_decay);
      EXPECT_EQ(s.grad_scale, 0.125f);
    }
  }
  // Step 1 by hand: 1/(1-0.9) = 10 and 1/sqrt(1-0.95) = 4.4721359...
  const StepScalars s1 = make_step_scalars(OptimizerKind::adamw, h, 1, 1.0f);
  EXPECT_NEAR(s1.bias_correction1, 10.0, 1e-5);
  EXPECT_NEAR(s1.bias_correction2_sqrt, 4.47213595, 1e-5);
}

TEST(StepScalars, SgdAndLion) {
  Hyperparams h;
  h.momentum = 0.8f;
  h.dampening = 0.25f;
  h.nesterov = true;
  const StepScalars a = make_step_scalars(OptimizerKind::sgd, h, 1, 2.0f);
  EXPECT_TRUE(a.first_step);
  EXPECT_TRUE(a.nesterov);
  EXPECT_EQ(a.momentum, 0.8f);
  EXPECT_EQ(a.one_minus_dampening, 0.75f);
  EXPECT_EQ(a.grad_scale, 2.0f);
  const StepScalars b = make_step_scalars(OptimizerKind::sgd, h, 2, 2.0f);
  EXPECT_FALSE(b.first_step);

  h.beta1 = 0.9f;
  h.beta2 = 0.99f;
  for (std::int64_t t : {1, 5}) {
    const StepScalars l = make_step_scalars(OptimizerKind::lion, h, t, 1.0f);
    EXPECT_EQ(l.beta1, 0.9f);
    EXPECT_EQ(l.beta2, 0.99f);
    expect_rounded(l.one_minus_beta1, 1.0 - static_cast<double>(h.beta1), "lion 1-b1");
    expect_rounded(l.one_minus_beta2, 1.0 - static_cast<double>(h.beta2), "lion 1-b2");
    EXPECT_EQ(l.bias_correction1, 1.0f);  // Lion has no bias correction
    EXPECT_EQ(l.bias_correction2_sqrt, 1.0f);
  }
}

TEST(StepScalars, Errors) {
  Hyperparams h;
  for (std::int64_t bad : {0, -1, -1000}) {
    try {
      make_step_scalars(OptimizerKind::adamw, h, bad, 1.0f);
      ADD_FAILURE() << "step " << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("step"), std::string::npos) << e.message();
    }
  }
  for (float lr : {-1e-3f, NAN, INFINITY, -INFINITY}) {
    h.lr = lr;
    for (OptimizerKind k : {OptimizerKind::adamw, OptimizerKind::adam, OptimizerKind::sgd, OptimizerKind::lion}) {
      try {
        make_step_scalars(k, h, 1, 1.0f);
        ADD_FAILURE() << "lr " << lr << " accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
        EXPECT_NE(e.message().find("lr"), std::string::npos) << e.message();
      }
    }
  }
  h.lr = 0.0f;  // lr 0 is legal (warm-up)
  EXPECT_NO_THROW(make_step_scalars(OptimizerKind::adamw, h, 1, 1.0f));
}

// ---- rules vs an independent float64 reference ---------------------------------------------------

enum class Variant { adamw, adam, sgd, sgd_nesterov, sgd_dampening, lion };
constexpr Variant kVariants[] = {Variant::adamw, Variant::adam, Variant::sgd,
                                 Variant::sgd_nesterov, Variant::sgd_dampening, Variant::lion};
const char* name(Variant v) {
  switch (v) {
    case Variant::adamw: return "adamw";
    case Variant::adam: return "adam";
    case Variant::sgd: return "sgd";
    case Variant::sgd_nesterov: return "sgd_nesterov";
    case Variant::sgd_dampening: return "sgd_dampening";
    case Variant::lion: return "lion";
  }
  return "?";
}
OptimizerKind kind_of(Variant v) {
  switch (v) {
    case Variant::adamw: return OptimizerKind::adamw;
    case Variant::adam: return OptimizerKind::adam;
    case Variant::lion: return OptimizerKind::lion;
    default: return OptimizerKind::sgd;
  }
}
Hyperparams hyper_of(Variant v) {
  Hyperparams h;
  h.weight_decay = 0.1f;
  switch (v) {
    case Variant::adamw:
    case Variant::adam:
      h.lr = 1e-2f;
      h.beta1 = 0.9f;
      h.beta2 = 0.99f;
      h.eps = 1e-8f;
      break;
    case Variant::lion:
      h.lr = 1e-3f;
      h.beta1 = 0.9f;
      h.beta2 = 0.99f;
      break;
    default:
      h.lr = 1e-2f;
      h.momentum = 0.9f;
      h.nesterov = v == Variant::sgd_nesterov;
      h.dampening = v == Variant::sgd_dampening ? 0.3f : 0.0f;
      break;
  }
  return h;
}

// One element of the float64 reference: the algorithm as published (Loshchilov & Hutter for AdamW,
// Kingma & Ba with L2 for Adam, PyTorch's SGD, Chen et al. for Lion), in double, plus a running
// bound on how far an fp32 implementation may drift from it.
//
// Error model: every fp32 operation rounds with relative error <= u = 2^-24, and each scalar that
// make_step_scalars rounds to float (1-beta, bias corrections) carries another u. Each quantity x
// has a reference value, an absolute error bound E_x for |x_fp32 - x_ref|, and where terms can
// cancel, a magnitude X (the same recurrence over absolute values) that the rounding errors are
// proportional to. The bounds follow the recurrences term by term:
//   m = b1*m + (1-b1)*g       E_m' = b1*E_m + (1-b1)*E_g + 3u*(b1*M + (1-b1)*G)
//   v = b2*v + (1-b2)*g^2     E_v' = b2*E_v + (1-b2)*(2*G*E_g + E_g^2) + 4u*V'
//   p = p - lr*wd*p - upd     E_p' = E_p*(1+lr*wd) + E_upd + rounding of the two subtractions
// and the test allows 2x the bound to cover the second-order terms the recurrences drop.
struct RefElem {
  double p = 0, m = 0, v = 0;        // reference state
  double Ep = 0, Em = 0, Ev = 0;     // error bounds
  double M = 0, V = 0;               // magnitudes
  bool ambiguous = false;            // lion: sign(c) too close to 0 to tell
};

struct Reference {
  Variant variant;
  Hyperparams h;
  double gs;

  void step(RefElem& e, double graw, std::int64_t t) const {
    const double lr = h.lr, wd = h.weight_decay, u = kU;
    const double P = std::fabs(e.p) + e.Ep;
    const double gscaled = graw * gs;
    switch (variant) {
      case Variant::adamw:
      case Variant::adam: {
        const bool l2 = variant == Variant::adam;
        const double b1 = h.beta1, b2 = h.beta2, eps = h.eps;
        const double g = gscaled + (l2 ? wd * e.p : 0.0);
        const double G = std::fabs(gscaled) + (l2 ? wd * P : 0.0);
        const double Eg = l2 ? wd * e.Ep + 2 * u * G : u * G;
        e.m = b1 * e.m + (1 - b1) * g;
        e.Em = b1 * e.Em + (1 - b1) * Eg + 3 * u * (b1 * e.M + (1 - b1) * G);
        e.M = b1 * e.M + (1 - b1) * G;
        e.v = b2 * e.v + (1 - b2) * g * g;
        e.V = b2 * e.V + (1 - b2) * G * G;
        e.Ev = b2 * e.Ev + (1 - b2) * (2 * G * Eg + Eg * Eg) + 4 * u * e.V;
        const double c1 = 1.0 / (1.0 - std::pow(b1, static_cast<double>(t)));
        const double c2 = 1.0 / std::sqrt(1.0 - std::pow(b2, static_cast<double>(t)));
        const double sq = std::sqrt(e.v);
        const double Esq = (e.v > 0 ? std::min(e.Ev / sq, std::sqrt(e.Ev)) : std::sqrt(e.Ev)) + u * std::sqrt(e.V);
        const double d = sq * c2 + eps;
        const double Ed = c2 * Esq + 3 * u * (c2 * std::sqrt(e.V) + eps);
        // The fp32 denominator is never below eps (sqrt >= 0, then + eps, rounding is monotone);
        // d - Ed can be, when L2 decay nearly cancels the gradient and v is tiny next to V.
        const double dlow = std::max(d - Ed, eps);
        const double upd = lr * c1 * e.m / d;
        const double U = lr * c1 * e.M / dlow;
        const double Eupd = lr * c1 * (e.Em / dlow + e.M * Ed / (d * dlow)) + 4 * u * U;
        if (!l2) {
          const double p1 = e.p - lr * wd * e.p;
          const double Ep1 = e.Ep * (1 + lr * wd) + 3 * u * lr * wd * P + u * P;
          e.p = p1 - upd;
          e.Ep = Ep1 + Eupd + u * (std::fabs(p1) + Ep1 + U);
        } else {
          e.p = e.p - upd;
          e.Ep = e.Ep + Eupd + u * (P + U);
        }
        break;
      }
      case Variant::sgd:
      case Variant::sgd_nesterov:
      case Variant::sgd_dampening: {
        const double mom = h.momentum, damp = h.dampening;
        const double g = gscaled + wd * e.p;
        const double G = std::fabs(gscaled) + wd * P;
        const double Eg = wd * e.Ep + 2 * u * G;
        if (t == 1) {  // PyTorch: the buffer starts as the gradient, undamped
          e.m = g;
          e.Em = Eg;
          e.M = G;
        } else {
          e.m = mom * e.m + (1 - damp) * g;
          e.Em = mom * e.Em + (1 - damp) * Eg + 3 * u * (mom * e.M + (1 - damp) * G);
          e.M = mom * e.M + (1 - damp) * G;
        }
        double dir = e.m, Edir = e.Em, D = e.M;
        if (h.nesterov) {
          dir = g + mom * e.m;
          Edir = Eg + mom * e.Em + 2 * u * (G + mom * e.M);
          D = G + mom * e.M;
        }
        e.p = e.p - lr * dir;
        e.Ep = e.Ep + lr * Edir + 2 * u * (P + lr * D);
        break;
      }
      case Variant::lion: {
        const double b1 = h.beta1, b2 = h.beta2;
        const double g = gscaled, G = std::fabs(gscaled), Eg = u * G;
        const double c = b1 * e.m + (1 - b1) * g;
        const double Ec = b1 * e.Em + (1 - b1) * Eg + 3 * u * (b1 * e.M + (1 - b1) * G);
        // If c is within its error bound of 0 the fp32 sign may differ; the element is then
        // excluded from further checks (the caller counts these; they must be rare).
        if (std::fabs(c) <= 2 * Ec) e.ambiguous = true;
        const double sgn = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
        const double p1 = e.p - lr * wd * e.p;
        const double Ep1 = e.Ep * (1 + lr * wd) + 3 * u * lr * wd * P + u * P;
        e.p = p1 - lr * sgn;
        e.Ep = Ep1 + u * (std::fabs(p1) + Ep1 + lr);
        e.m = b2 * e.m + (1 - b2) * g;
        e.Em = b2 * e.Em + (1 - b2) * Eg + 3 * u * (b2 * e.M + (1 - b2) * G);
        e.M = b2 * e.M + (1 - b2) * G;
        break;
      }
    }
  }
};

struct RunResult {
  std::size_t violations = 0;  // master or state outside its bound
  std::size_t out_mismatch = 0;  // param copy != round(master)
  std::size_t ambiguous = 0;
  std::string first;
};

// Runs `steps` steps of the kernel on `n` elements and checks every element after every step.
// step_shift perturbs the step number given to make_step_scalars (for the can-fail check).
RunResult run_against_reference(Isa isa, Variant var, DType gdt, DType pdt, std::size_t n, int steps,
                                int step_shift = 0) {
  const Hyperparams h = hyper_of(var);
  const float grad_scale = 0.83f / 256.0f;  // a loss scale of 256 and a clip coefficient
  const OptimizerKind kind = kind_of(var);
  const Reference ref{var, h, static_cast<double>(grad_scale)};

  std::mt19937 rng(1234 + static_cast<unsigned>(var) * 7 + static_cast<unsigned>(gdt) * 3 +
                   static_cast<unsigned>(pdt));
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> expo(-2.0, 1.0);

  std::vector<float> master(n), s1(n, 0.0f), s2(n, 0.0f), out32(n);
  std::vector<std::uint16_t> out16(n), g16(n);
  std::vector<float> g32(n);
  std::vector<RefElem> r(n);
  for (std::size_t i = 0; i < n; ++i) {
    master[i] = static_cast<float>(normal(rng));
    r[i].p = master[i];
    // SGD overwrites its buffer on step 1, so garbage there must not matter.
    if (kind == OptimizerKind::sgd) s1[i] = static_cast<float>(normal(rng) * 100.0);
  }

  RunResult res;
  for (int t = 1; t <= steps; ++t) {
    std::vector<double> graw(n);
    for (std::size_t i = 0; i < n; ++i) {
      // Gradients as the loss-scaled trainer produces them: magnitudes over three decades, never
      // tiny (so Adam's v and Lion's c stay away from 0), held in the grad dtype.
      double x;
      do {
        x = normal(rng) * 256.0 * std::pow(10.0, expo(rng));
        if (gdt == DType::fp32) {
          g32[i] = static_cast<float>(x);
          graw[i] = g32[i];
        } else {
          g16[i] = expected_to16(static_cast<float>(x), gdt);
          graw[i] = decode(g16[i], format_of(gdt));
        }
      } while (std::fabs(graw[i]) < 1e-2);
    }
    UpdateArgs a;
    a.rule = kind;
    a.scalars = make_step_scalars(kind, h, t + step_shift, grad_scale);
    a.master = master.data();
    a.state1 = s1.data();
    a.state2 = state_count(kind) == 2 ? s2.data() : nullptr;
    a.grad = gdt == DType::fp32 ? static_cast<const void*>(g32.data()) : g16.data();
    a.grad_dtype = gdt;
    a.param_out = pdt == DType::fp32 ? static_cast<void*>(out32.data()) : out16.data();
    a.param_dtype = pdt;
    a.n = n;
    cpu::kernels(isa).fused_update(a);

    for (std::size_t i = 0; i < n; ++i) {
      RefElem& e = r[i];
      if (e.ambiguous) continue;
      ref.step(e, graw[i], t);
      if (e.ambiguous) {
        ++res.ambiguous;
        continue;
      }
      auto check = [&](const char* what, double got, double want, double bound) {
        if (!(std::fabs(got - want) <= 2.0 * bound)) {
          if (res.violations++ == 0)
            res.first = std::string(what) + " i=" + std::to_string(i) + " step=" + std::to_string(t) +
                        " got=" + std::to_string(got) + " want=" + std::to_string(want) +
                        " diff=" + std::to_string(std::fabs(got - want)) + " bound=" + std::to_string(2 * bound);
        }
      };
      check("master", master[i], e.p, e.Ep);
      check("state1", s1[i], e.m, e.Em);
      if (state_count(kind) == 2) check("state2", s2[i], e.v, e.Ev);
      // The parameter copy is exactly the nearest value of its dtype to the fp32 master.
      const bool same = pdt == DType::fp32 ? bits(out32[i]) == bits(master[i])
                                           : out16[i] == expected_to16(master[i], pdt);
      if (!same) ++res.out_mismatch;
    }
  }
  return res;
}

TEST(Rules, AgainstFloat64Reference) {
  for (Isa isa : available_isas())
    for (Variant v : kVariants)
      for (DType g : {DType::fp32, DType::bf16, DType::fp16})
        for (DType p : {DType::fp32, DType::bf16, DType::fp16}) {
          const RunResult r = run_against_reference(isa, v, g, p, 1000, 20);
          const std::string what = std::string(cpu::name_of(isa)) + " " + name(v) + " grad " +
                                   std::string(name_of(g)) + " param " + std::string(name_of(p));
          EXPECT_EQ(r.violations, 0u) << what << ": " << r.first;
          EXPECT_EQ(r.out_mismatch, 0u) << what;
          EXPECT_LE(r.ambiguous, 5u) << what;  // 1000 elements x 20 steps; expected ~0
        }
}

// The bounds are tight enough to see a real mistake: bias corrections of the wrong step, or SGD's
// first-step rule applied on the wrong step, are flagged.
TEST(Rules, ReferenceCheckCanFail) {
  EXPECT_GT(run_against_reference(Isa::scalar, Variant::adamw, DType::fp32, DType::fp32, 1000, 20, 1).violations, 0u);
  EXPECT_GT(run_against_reference(Isa::scalar, Variant::adam, DType::bf16, DType::bf16, 1000, 20, 1).violations, 0u);
  EXPECT_GT(run_against_reference(Isa::scalar, Variant::sgd, DType::fp32, DType::fp32, 1000, 20, 1).violations, 0u);
}

// ---- every instruction set gives the scalar path's bits ------------------------------------------

// Inputs with the awkward values mixed in: zeros of both signs, fp16-subnormal gradients, huge
// gradients that overflow fp16 when rounded, infinities and NaNs (a few, so most lanes are finite).
float awkward(std::mt19937& rng, std::normal_distribution<float>& d, bool allow_nonfinite) {
  const int k = static_cast<int>(rng() % 64);
  if (k == 0) return 0.0f;
  if (k == 1) return -0.0f;
  if (k == 2) return d(rng) * 1e-6f;
  if (k == 3) return d(rng) * 1e-41f;
  if (k == 4) return d(rng) * 1e6f;
  if (allow_nonfinite && k == 5) return INFINITY;
  if (allow_nonfinite && k == 6) return NAN;
  return d(rng);
}

// Equal bits, except that two NaNs count as equal: which NaN operand x86 propagates depends on the
// operand order the compiler chose, which may differ between scalar and vector code.
bool same_bits(const void* a, const void* b, DType t, std::size_t n, std::size_t& where) {
  for (std::size_t i = 0; i < n; ++i) {
    if (t == DType::fp32) {
      const float x = static_cast<const float*>(a)[i], y = static_cast<const float*>(b)[i];
      if (bits(x) != bits(y) && !(std::isnan(x) && std::isnan(y))) return where = i, false;
    } else {
      const std::uint16_t x = static_cast<const std::uint16_t*>(a)[i], y = static_cast<const std::uint16_t*>(b)[i];
      const auto& f = format_of(t);
      if (x != y && !(testing::is_nan16(x, f) && testing::is_nan16(y, f))) return where = i, false;
    }
  }
  return true;
}

enum class OutMode { none, fp32, fp32_in_place, fp16, bf16 };

struct UpdateBuffers {
  Guarded master, s1, s2, grad, out;
  UpdateBuffers(std::size_t n, std::size_t off, DType gdt, DType pdt)
      : master(n, 4, off), s1(n, 4, off), s2(n, 4, off), grad(n, size_of(gdt), off), out(n, size_of(pdt), off) {}
};

TEST(Rules, EveryIsaMatchesScalarBits) {
  const std::size_t sizes[] = {0, 1, 7, 15, 16, 17, 1000, 4099};
  const std::size_t offsets[] = {0, 1, 3};
  const OutMode outs[] = {OutMode::none, OutMode::fp32, OutMode::fp32_in_place, OutMode::fp16, OutMode::bf16};
  std::size_t compared = 0;
  for (Variant var : kVariants)
    for (bool first : {true, false})
      for (DType gdt : {DType::fp32, DType::fp16, DType::bf16})
        for (OutMode om : outs)
          for (std::size_t n : sizes)
            for (std::size_t off : offsets) {
              const OptimizerKind kind = kind_of(var);
              if (kind != OptimizerKind::sgd && first) continue;  // first_step only matters for SGD
              const DType pdt = om == OutMode::fp16 ? DType::fp16 : om == OutMode::bf16 ? DType::bf16 : DType::fp32;
              std::mt19937 rng(static_cast<unsigned>(n * 131 + off * 7 + static_cast<unsigned>(var)));
              std::normal_distribution<float> d(0.0f, 1.0f);
              // Initial contents, shared by every run.
              std::vector<float> m0(n), a0(n), b0(n), g0(n);
              for (std::size_t i = 0; i < n; ++i) {
                m0[i] = awkward(rng, d, true);
                a0[i] = awkward(rng, d, false);
                b0[i] = std::fabs(awkward(rng, d, false));  // Adam's v is never negative
                g0[i] = awkward(rng, d, true) * 300.0f;
              }
              Hyperparams h = hyper_of(var);
              StepScalars sc = make_step_scalars(kind, h, first ? 1 : 3, 0.37f / 128.0f);

              auto run = [&](auto&& update, UpdateBuffers& b) {
                for (std::size_t i = 0; i < n; ++i) {
                  b.master.as<float>()[i] = m0[i];
                  b.s1.as<float>()[i] = a0[i];
                  b.s2.as<float>()[i] = b0[i];
                  store_from_float(b.grad.data(), gdt, i, g0[i]);
                }
                UpdateArgs a;
                a.rule = kind;
                a.scalars = sc;
                a.master = b.master.as<float>();
                a.state1 = b.s1.as<float>();
                a.state2 = state_count(kind) == 2 ? b.s2.as<float>() : nullptr;
                a.grad = b.grad.data();
                a.grad_dtype = gdt;
                a.param_out = om == OutMode::none ? nullptr
                              : om == OutMode::fp32_in_place ? static_cast<void*>(a.master)
                                                            : b.out.data();
                a.param_dtype = pdt;
                a.n = n;
                update(a);
              };
              UpdateBuffers want(n, off, gdt, pdt);
              run(cpu::kernels(Isa::scalar).fused_update, want);

              // A plain loop over the header's rule functions and dtype.hpp conversions: the
              // arithmetic the CUDA kernels run. (This file is built without FMA, so the compiler
              // cannot contract it.)
              UpdateBuffers plain(n, off, gdt, pdt);
              run(
                  [&](const UpdateArgs& a) {
                    for (std::size_t i = 0; i < a.n; ++i) {
                      float p = a.master[i], s1 = a.state1[i], s2 = a.state2 ? a.state2[i] : 0.0f;
                      const float g = load_as_float(a.grad, a.grad_dtype, i);
                      switch (a.rule) {
                        case OptimizerKind::adamw: rules::adamw(p, g, s1, s2, a.scalars); break;
                        case OptimizerKind::adam: rules::adam(p, g, s1, s2, a.scalars); break;
                        case OptimizerKind::sgd: rules::sgd(p, g, s1, a.scalars); break;
                        case OptimizerKind::lion: rules::lion(p, g, s1, a.scalars); break;
                        default: break;  // rules added later have their own tests (tests/rules/)
                      }
                      a.master[i] = p;
                      a.state1[i] = s1;
                      if (a.state2) a.state2[i] = s2;
                      if (a.param_out && a.param_out != static_cast<void*>(a.master))
                        store_from_float(a.param_out, a.param_dtype, i, p);
                    }
                  },
                  plain);

              std::vector<std::pair<std::string, UpdateBuffers*>> others{{"plain loop", &plain}};
              std::vector<std::unique_ptr<UpdateBuffers>> keep;
              for (Isa isa : available_isas()) {
                if (isa == Isa::scalar) continue;
                keep.push_back(std::make_unique<UpdateBuffers>(n, off, gdt, pdt));
                run(cpu::kernels(isa).fused_update, *keep.back());
                others.emplace_back(cpu::name_of(isa), keep.back().get());
              }
              for (auto& [who, got] : others) {
                const std::string what = who + " vs scalar: " + name(var) + (first ? " step1" : "") + " grad " +
                                         std::string(name_of(gdt)) + " out " + std::to_string(static_cast<int>(om)) +
                                         " n=" + std::to_string(n) + " offset=" + std::to_string(off);
                std::size_t at = 0;
                ASSERT_TRUE(same_bits(got->master.data(), want.master.data(), DType::fp32, n, at)) << what << " master " << at;
                ASSERT_TRUE(same_bits(got->s1.data(), want.s1.data(), DType::fp32, n, at)) << what << " state1 " << at;
                ASSERT_TRUE(same_bits(got->s2.data(), want.s2.data(), DType::fp32, n, at)) << what << " state2 " << at;
                if (om != OutMode::none && om != OutMode::fp32_in_place) {
                  ASSERT_TRUE(same_bits(got->out.data(), want.out.data(), pdt, n, at)) << what << " param_out " << at;
                }
                ASSERT_TRUE(got->master.guards_intact() && got->s1.guards_intact() && got->s2.guards_intact() &&
                            got->grad.guards_intact() && got->out.guards_intact())
                    << what;
                ++compared;
              }
            }
  EXPECT_GT(compared, 1000u);
}

// Slicing the update into chunks (as the backend does over its thread pool) gives the same bits.
TEST(Rules, SliceMatchesWhole) {
  const std::size_t n = 1000;
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> m(n), s1(n, 0.1f), s2(n, 0.2f);
  std::vector<std::uint16_t> g(n), out(n);
  for (std::size_t i = 0; i < n; ++i) {
    m[i] = d(rng);
    g[i] = expected_to16(d(rng), DType::bf16);
  }
  auto m2 = m, s12 = s1, s22 = s2;
  auto out2 = out;
  UpdateArgs a;
  a.rule = OptimizerKind::adamw;
  a.scalars = make_step_scalars(OptimizerKind::adamw, hyper_of(Variant::adamw), 4, 0.5f);
  a.grad = g.data();
  a.grad_dtype = DType::bf16;
  a.param_dtype = DType::bf16;
  a.n = n;
  a.master = m.data();
  a.state1 = s1.data();
  a.state2 = s2.data();
  a.param_out = out.data();
  const auto& k = cpu::kernels(cpu::active_isa());
  k.fused_update(a);
  UpdateArgs b = a;
  b.master = m2.data();
  b.state1 = s12.data();
  b.state2 = s22.data();
  b.param_out = out2.data();
  for (std::size_t begin = 0; begin < n; begin += 129) k.fused_update(cpu::slice(b, begin, std::min<std::size_t>(129, n - begin)));
  EXPECT_EQ(std::memcmp(m.data(), m2.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(s1.data(), s12.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(s2.data(), s22.data(), n * 4), 0);
  EXPECT_EQ(std::memcmp(out.data(), out2.data(), n * 2), 0);
  // slice keeps null pointers null and offsets the typed ones by their element size.
  UpdateArgs c = b;
  c.state2 = nullptr;
  c.param_out = nullptr;
  const UpdateArgs s = cpu::slice(c, 10, 5);
  EXPECT_EQ(s.state2, nullptr);
  EXPECT_EQ(s.param_out, nullptr);
  EXPECT_EQ(s.master, m2.data() + 10);
  EXPECT_EQ(s.grad, static_cast<const void*>(g.data() + 10));
  EXPECT_EQ(s.n, 5u);
}

TEST(Rules, KernelArgumentErrors) {
  for (Isa isa : available_isas()) {
    const auto& k = cpu::kernels(isa);
    std::vector<float> m(8, 1.0f), s(8, 0.0f), g(8, 1.0f);
    const std::vector<float> before = m;
    UpdateArgs a;
    a.scalars = make_step_scalars(OptimizerKind::adamw, Hyperparams{}, 1, 1.0f);
    a.n = 8;
    a.grad = g.data();
    a.state1 = s.data();
    a.state2 = s.data();
    EXPECT_THROW(k.fused_update(a), Error);  // master null
    a.master = m.data();
    a.state2 = nullptr;
    EXPECT_THROW(k.fused_update(a), Error);  // adamw needs state2
    a.state2 = s.data();
    a.param_out = m.data();
    a.param_dtype = DType::bf16;
    EXPECT_THROW(k.fused_update(a), Error);  // 16-bit copy cannot live in the fp32 master
    EXPECT_EQ(std::memcmp(before.data(), m.data(), 32), 0);  // nothing was written
    UpdateArgs empty;
    EXPECT_NO_THROW(k.fused_update(empty));  // n == 0: nothing to touch
  }
}

}  // namespace
}  // namespace shardopt

#pragma once
// Learning-rate schedules, evaluated from the step counter inside step control (step_control.hpp),
// on the host or on the device, with the same bits on both: only + - * / and sqrt in double (the
// cosine is a polynomial, not a library cos(), which may differ between them in the last place),
// then one rounding to float.
//
// For the update of step t >= 1 (t counts applied updates; a skipped step does not advance it),
// base = Hyperparams::lr, W = warmup_steps, T = total_steps, floor = min_lr:
//   t <= W (warm-up, any schedule):  lr_t = base * t / W
//   constant:                        lr_t = base
//   cosine:                          lr_t = floor + (base - floor) * (1 + cos(pi * q)) / 2
//   linear:                          lr_t = floor + (base - floor) * (1 - q)
//          with q = (t - W) / (T - W), and q = 1 from step T on (lr_t = floor)
//   inverse_sqrt:                    lr_t = max(floor, base * sqrt(max(W, 1) / t))
// so the warm-up reaches `base` at step W exactly and every schedule is continuous there. The
// constant schedule without warm-up applies `lr` itself, unrounded.
#include <cstdint>
#include <string_view>

#include "shardopt/dtype.hpp"

namespace shardopt {

enum class LrSchedule : std::uint8_t { constant, cosine, linear, inverse_sqrt };
std::string_view name_of(LrSchedule s) noexcept;
// "constant" | "cosine" | "linear" | "inverse-sqrt" (also "inverse_sqrt"); false if unknown.
bool parse_lr_schedule(std::string_view text, LrSchedule& out) noexcept;

namespace rules {

// cos(pi * q) for q in [0, 1]: reduced to [0, pi/4] by the symmetries of cos and sin, then Taylor
// polynomials to x^16 / x^15 (remainder below 2^-60 there). cos_pi(0) = 1, cos_pi(0.5) = 0 and
// cos_pi(1) = -1 exactly.
SHARDOPT_HD inline double cos_pi(double q) {
  constexpr double kPi = 3.141592653589793116;
  const bool negate = q > 0.5;
  const double r = negate ? 1.0 - q : q;  // exact for q in [0.5, 1]
  double out;
  if (r <= 0.25) {
    const double x = kPi * r, x2 = x * x;
    double c = 1.0 - x2 / 240.0;
    c = 1.0 - x2 / 182.0 * c;
    c = 1.0 - x2 / 132.0 * c;
    c = 1.0 - x2 / 90.0 * c;
    c = 1.0 - x2 / 56.0 * c;
    c = 1.0 - x2 / 30.0 * c;
    c = 1.0 - x2 / 12.0 * c;
    out = 1.0 - x2 / 2.0 * c;
  } else {
    const double x = kPi * (0.5 - r), x2 = x * x;  // 0.5 - r exact for r in [0.25, 0.5]
    double c = 1.0 - x2 / 210.0;
    c = 1.0 - x2 / 156.0 * c;
    c = 1.0 - x2 / 110.0 * c;
    c = 1.0 - x2 / 72.0 * c;
    c = 1.0 - x2 / 42.0 * c;
    c = 1.0 - x2 / 20.0 * c;
    c = 1.0 - x2 / 6.0 * c;
    out = x * c;
  }
  return negate ? -out : out;
}

}  // namespace rules
}  // namespace shardopt

//! Element-wise math for the CPU kernels.
//!
//! [`exp_f32`] is Cephes' `expf` (Moshier 1992): `x = n·ln 2 + r` with |r| ≤ ln 2 / 2, a
//! degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits. Unlike a call into
//! libm it inlines into the kernels' loops, which the compiler then vectorises; softmax, the
//! loss and SwiGLU's sigmoid spend most of their time in `exp`. Accuracy is about 1 ulp on
//! the range that matters here.

/// `e^x` in float32: 0 below −87.3 (where the result would be subnormal), and saturating at
/// `e^88.37` (≈ 2.4·10³⁸) above; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split into a part exact in float32 and a correction (Cody & Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.376_26;
    let clamped = x.clamp(LOW, HIGH);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    // NaN propagates through the clamp and the polynomial; the one select keeps the loop
    // branch-free.
    let y = er * scale;
    if x < LOW {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::INFINITY) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}

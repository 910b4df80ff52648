//! The learning-rate schedule: linear warmup, then a cosine decay to `min_lr` or a constant.
//!
//! A pure function of the step, so resuming needs no schedule state.

use crate::spec::Decay;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = Schedule { lr: 1.0, min_lr: 0.1, warmup_steps: 4, total_steps: 14, decay: Decay::Cosine };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.55).abs() < 1e-12, "halfway down: {}", s.lr(9));
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!(s.lr(5) < s.lr(4) && s.lr(13) > 0.1);
        let c = Schedule { decay: Decay::Constant, ..s };
        assert_eq!(c.lr(2), 0.75);
        assert_eq!(c.lr(13), 1.0);
    }
}

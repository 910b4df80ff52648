//! `btm device-check --device cuda [--fixtures DIR] [--steps N] [--json]`: the GPU build's
//! parity with the CPU (logits of the fixture checkpoints, the fused MoE layer against the
//! reference loop, a short training run's loss curve); see `btm_trainer::device_check`.
//! Exits with status 1 when any comparison is outside its tolerance.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// The device to check against the CPU.
    #[arg(long, value_enum, default_value_t = super::Device::Cuda)]
    device: super::Device,
    /// The fixture checkpoints (`model/tests/fixtures` of the source tree).
    #[arg(long, default_value = "model/tests/fixtures")]
    fixtures: std::path::PathBuf,
    /// Training steps compared.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: DeviceCheckArgs) -> Result<()> {
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    let device = args.device.open()?;
    let r = btm_trainer::device_check::run(&device, &args.fixtures, args.steps)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("device check: {}", r.device);
        for (section, checks) in [("logits vs the CPU", &r.logits), ("fused MoE", &r.fused_moe), ("training loss vs the CPU", &r.training)]
        {
            println!("{section}:");
            for c in checks {
                println!(
                    "  {} {}: max difference {:.3e} (tolerance {:.0e})",
                    if c.passed { "ok  " } else { "FAIL" },
                    c.check,
                    c.max_diff,
                    c.tolerance
                );
            }
        }
    }
    if !r.passed {
        anyhow::bail!("device check failed on {}: see the FAIL lines", r.device);
    }
    Ok(())
}

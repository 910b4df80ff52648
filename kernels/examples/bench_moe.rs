//! Fused vs reference MoE layer, forward + backward, on the CPU (the measuring code of
//! `btm bench moe`, runnable on its own):
//!
//! `cargo run --release -p btm-kernels --example bench_moe -- [--tokens T] [--hidden H] [--reps N] [--fused-only] [--json]`

use btm_kernels::bench::{bench_moe, format_result, MoeBenchSpec};
use candle_core::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut spec = MoeBenchSpec::default();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            |name: &str| -> Result<usize, Box<dyn std::error::Error>> { Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?) };
        match arg.as_str() {
            "--tokens" => spec.tokens = value("--tokens")?,
            "--hidden" => spec.hidden = value("--hidden")?,
            "--reps" => spec.reps = value("--reps")?,
            "--fused-only" => spec.reference = false,
            "--json" => json = true,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let results = bench_moe(&spec, &Device::Cpu, |r| eprintln!("{}", format_result(r)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

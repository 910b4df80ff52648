//! `btm-train-worker JOB.yaml [--hang-after-checkpoint STEP]`: runs a job exactly as
//! `btm train --job JOB.yaml` does. The tests start it as a child process and kill it;
//! `--hang-after-checkpoint` makes it print `checkpoint STEP` and wait to be killed once that
//! checkpoint is published, so a test can kill it at a known point.

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (job, hang) = match args.as_slice() {
        [job] => (job.clone(), None),
        [job, flag, step] if flag == "--hang-after-checkpoint" => (job.clone(), step.parse::<u64>().ok()),
        _ => {
            eprintln!("usage: btm-train-worker JOB.yaml [--hang-after-checkpoint STEP]");
            std::process::exit(2);
        }
    };
    let result = (|| -> anyhow::Result<btm_trainer::Outcome> {
        let spec = btm_trainer::JobSpec::load(std::path::Path::new(&job))?;
        let stop = btm_trainer::signals::install()?;
        let on_checkpoint: btm_trainer::train::CheckpointHook = Box::new(move |step, _dir| {
            println!("checkpoint {step}");
            let _ = std::io::stdout().flush();
            if hang == Some(step) {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        });
        let options = btm_trainer::Options { stop, quiet: true, on_checkpoint: Some(on_checkpoint) };
        btm_trainer::run(&spec, options)
    })();
    match result {
        Ok(btm_trainer::Outcome::Finished { step, .. }) => println!("finished {step}"),
        Ok(btm_trainer::Outcome::Interrupted { step, signal, .. }) => {
            println!("interrupted {step}");
            std::process::exit(128 + signal);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

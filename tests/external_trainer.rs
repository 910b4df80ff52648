//! Training phases handed to an external engine through Hugging Face checkpoints: the
//! reference trainer `scripts/train_hf.py` under `torchrun --nproc_per_node 2` (PyTorch DDP over
//! gloo) trains the experts, btm merges, continues, evaluates and reports; a re-run does
//! nothing; SIGKILL of the orchestrator mid-expert and a re-run finish the run. And the
//! contract's failures, with commands that need no Python: output missing, another
//! architecture, a command not found, an unknown placeholder.
//!
//! The PyTorch part needs a Python with `torch` and `transformers`: `BTM_PYTHON`, else
//! `/opt/pyref/bin/python`, else `python3`. Without one it says so and skips, unless
//! `BTM_REQUIRE_TORCH=1` (CI), which makes that a failure.

mod common;

use common::{btm, fixture_pipeline, ok, path_with, repo, torch_python, torchrun_trainer};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Two experts from the llama fixture, trained by `trainer` (YAML), merged and continued by btm.
fn pipeline(dir: &Path, name: &str, trainer: &str, steps: u64) -> PathBuf {
    let engine = "{kind: local, slots: 2, threads_per_job: 1, retries: 1}";
    let train = format!("steps: {steps}, batch_size: 4, seq_len: 32, checkpoint_interval: 4, log_interval: 2, trainer: {trainer}");
    fixture_pipeline(dir, name, &dir.join("runs").display().to_string(), engine, &train, "continue: {steps: 2}\n")
}

/// A pipeline whose expert trainer's command has a misspelt placeholder.
fn typo_file(d: &Path) -> PathBuf {
    pipeline(d, "typo", "{kind: command, command: \"train {model_in} {modle_out}\"}", 4)
}

/// [`common::wait_for`], polling every 100 ms.
fn wait_for(what: &str, deadline: Duration, f: impl FnMut() -> bool) {
    common::wait_for(what, deadline, Duration::from_millis(100), f)
}

#[test]
fn torchrun_trains_the_experts_and_btm_merges_continues_and_reports() {
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let path = path_with(&python);
    let file = pipeline(tmp.path(), "ext", &torchrun_trainer(), 8);
    let dry = ok(btm().env("PATH", &path).arg("run").arg(&file).arg("--dry-run").output().unwrap());
    assert!(dry.contains("exec torchrun --standalone --nnodes 1 --nproc_per_node 2"), "{dry}");

    let out = ok(btm().env("PATH", &path).arg("run").arg(&file).arg("--quiet").output().unwrap());
    let run = tmp.path().join("runs/ext");
    for model in ["expert-scripture", "expert-code", "merged", "continued"] {
        assert!(out.contains(&format!("| {model} |")), "{model} missing from the table:\n{out}");
    }
    // Published as btm publishes its own: manifest, lineage naming the command, metrics.
    let expert = run.join("experts/scripture");
    assert!(expert.join("model/MANIFEST.json").is_file());
    let lineage = std::fs::read_to_string(expert.join("model/btm.json")).unwrap();
    assert!(lineage.contains("train_hf.py") && lineage.contains("\"domain\": \"scripture\""), "{lineage}");
    let metrics = std::fs::read_to_string(expert.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":8") && metrics.contains("val_ppl"), "{metrics}");
    let log = std::fs::read_to_string(run.join("logs/expert-scripture.log")).unwrap();
    assert!(log.contains("external trainer: exec torchrun"), "{log}");
    assert!(run.join("report.md").is_file());
    let again = ok(btm().env("PATH", &path).arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do: all"), "{again}");

    // SIGKILL of the orchestrator once the external trainer has checkpointed; a re-run resumes
    // it from its own checkpoint and finishes the run.
    let file = pipeline(tmp.path(), "killed", &torchrun_trainer(), 40);
    let run = tmp.path().join("runs/killed");
    let mut child =
        btm().env("PATH", &path).arg("run").arg(&file).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let work = run.join("experts/code/external/work");
    wait_for("an external checkpoint", Duration::from_secs(300), || {
        std::fs::read_dir(&work).is_ok_and(|d| d.flatten().any(|e| e.path().join("state.json").exists()))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!run.join("jobs/expert-code/done.json").exists(), "the kill came too late to test resume");
    std::thread::sleep(Duration::from_secs(2)); // the trainers die with the orchestrator
    ok(btm().env("PATH", &path).arg("run").arg(&file).arg("--quiet").output().unwrap());
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("train_hf.py: resuming from"), "{log}");
    assert!(run.join("continued/model/MANIFEST.json").is_file());
}

/// The contract's failures, each a named error in the job's log; the jobs that do not depend
/// on the failed one still run, and a re-run after the fix finishes.
#[test]
fn contract_failures_are_named_and_the_rest_of_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let qwen = repo().join("model/tests/fixtures/qwen2").display().to_string();
    for (name, command, want) in [
        ("nothing", "true", "exited 0 but left no valid Hugging Face checkpoint"),
        ("other-arch", &format!("cp -r {qwen}/. {{model_out}}/") as &str, "external trainer: the output is not the input's architecture: "),
        ("not-found", "btm-no-such-trainer {model_in}", "command not found (exit 127)"),
    ] {
        // Only the code expert runs the failing command; scripture trains with btm.
        let file = pipeline(d, name, "{kind: btm}", 4);
        let yaml = std::fs::read_to_string(&file).unwrap().replacen(
            "  - {name: code,",
            &format!("  - {{overrides: {{trainer: {{kind: command, command: \"{command}\"}}}}, name: code,"),
            1,
        );
        std::fs::write(&file, yaml).unwrap();
        let out = btm().arg("run").arg(&file).arg("--quiet").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the run passed");
        assert!(err.contains("job expert/code failed") && err.contains("depend on failed ones did not start"), "{name}: {err}");
        let run = d.join("runs").join(name);
        let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
        assert!(log.contains(want), "{name}: {log}");
        assert!(!run.join("experts/code/model").exists(), "{name}: a model was published");
        // The independent expert finished.
        assert!(run.join("jobs/expert-scripture/done.json").exists(), "{name}: scripture did not finish");
    }

    // A trainer that honours the contract (here: it returns its input) is published, and the
    // failed run above finishes once fixed.
    let file = d.join("nothing.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap().replace("command: \"true\"", "command: \"cp -r {model_in}/. {model_out}/\"");
    std::fs::write(&file, yaml).unwrap();
    ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    let run = d.join("runs/nothing");
    assert!(run.join("experts/code/model/MANIFEST.json").is_file());
    assert!(run.join("continued/model/MANIFEST.json").is_file());

    // An unknown placeholder is a validation error at its line and column.
    let file = typo_file(d);
    let out = btm().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("typo.yaml:8:") && err.contains("experts.trainer: unknown placeholder `{modle_out}`"), "{err}");
    // A seed trained from scratch cannot go to an external trainer (it has no model to start from).
    let file = d.join("scratch.yaml");
    let yaml = std::fs::read_to_string(typo_file(d)).unwrap().replacen(
        &format!("seed: {{checkpoint: {}}}", repo().join("model/tests/fixtures/llama").display()),
        "seed: {model: {hidden_size: 32, layers: 1, heads: 2, ffn: 64, max_positions: 64}, tokenizer: {vocab_size: 300}, train: {steps: 2, trainer: {kind: command, command: \"true\"}}}",
        1,
    );
    std::fs::write(&file, yaml).unwrap();
    let out = btm().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seed.train.trainer: a seed trained from scratch has no model to start from"), "{err}");
}

/// A two-node torchrun launch, both "nodes" on this machine: each runs `btm train --job` with
/// the rendezvous its engine would set (Slurm's first node, Kubernetes's pod 0); the two
/// torchruns meet there (one process each, gloo), and node 0 alone checks and publishes.
#[test]
fn a_two_node_torchrun_meets_at_its_rendezvous_and_node_0_publishes() {
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let trainer = torchrun_trainer().replace("nproc_per_node: 2", "nproc_per_node: 1, nnodes: 2");
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "init: {{checkpoint: {}}}\nout: {}\ndata:\n  train: [{{path: {}}}]\n  valid: [{}]\n\
             steps: 4\nbatch_size: 2\nseq_len: 32\nseed: 1\ndomain: code\ntrainer: {trainer}\n",
            repo().join("model/tests/fixtures/llama").display(),
            tmp.path().join("out").display(),
            common::sample("code", "train"),
            common::sample("code", "valid"),
        ),
    )
    .unwrap();
    let path = path_with(&python);
    // Without the engine's rendezvous a multi-node job says what it needs.
    let out = btm().env("PATH", &path).args(["train", "--job"]).arg(&job).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BTM_RDZV_ENDPOINT"), "{}", String::from_utf8_lossy(&out.stderr));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = |rank: usize| {
        btm()
            .env("PATH", &path)
            .env("BTM_RDZV_ENDPOINT", format!("127.0.0.1:{port}"))
            .env("BTM_RDZV_ID", "two-nodes")
            .env("BTM_NODE_RANK", rank.to_string())
            .args(["train", "--job"])
            .arg(&job)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (node(0), node(1));
    let (a, b) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(a.status.success() && b.status.success(), "node 0:\n{}\nnode 1:\n{}", text(&a), text(&b));
    assert!(text(&a).contains("--rdzv_endpoint") && text(&b).contains("node 1: external trainer"), "{}\n{}", text(&a), text(&b));
    // Both torchruns formed one world of two processes: the script says so.
    assert!(text(&a).contains("world 2") || text(&b).contains("world 2"), "{}\n{}", text(&a), text(&b));
    let model = tmp.path().join("out/model");
    assert!(model.join("MANIFEST.json").is_file() && model.join("btm.json").is_file());
}

/// Folders btm writes load in the Hugging Face ecosystem as they are: `AutoTokenizer` finds a
/// seed's chat template and pad token, kept byte for byte; for a tokenizer without a
/// `tokenizer_config.json` (as btm trains them) it finds bos, eos and a pad token in the one btm
/// writes; and `huggingface_hub` parses the model card.
#[test]
fn written_folders_carry_the_tokenizer_config_and_a_model_card() {
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let llama = repo().join("model/tests/fixtures/llama");
    let seed = tmp.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(llama.join(f), seed.join(f)).unwrap();
    }
    let template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}";
    let config = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<s>", "chat_template": template});
    std::fs::write(seed.join("tokenizer_config.json"), config.to_string()).unwrap();
    let (kept, made) = (tmp.path().join("kept"), tmp.path().join("made"));
    ok(btm().args(["convert", "--model"]).arg(&seed).arg("--out").arg(&kept).output().unwrap());
    ok(btm().args(["convert", "--model"]).arg(&llama).arg("--out").arg(&made).output().unwrap());
    let script = format!(
        "from transformers import AutoTokenizer\nfrom huggingface_hub import ModelCard\n\
         k = AutoTokenizer.from_pretrained({kept:?})\n\
         assert k.chat_template == {template:?} and k.pad_token == '<s>', (k.chat_template, k.pad_token)\n\
         m = AutoTokenizer.from_pretrained({made:?})\n\
         assert (m.bos_token, m.eos_token, m.pad_token) == ('<s>', '</s>', '</s>'), (m.bos_token, m.eos_token, m.pad_token)\n\
         assert m('a b').input_ids == k('a b').input_ids\n\
         card = ModelCard.load({card:?})\n\
         assert 'btm' in card.data.tags, card.data\n\
         print('ok')\n",
        kept = kept.display().to_string(),
        made = made.display().to_string(),
        card = made.join("README.md").display().to_string(),
    );
    let out = std::process::Command::new(&python).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

//! mergekit itself (`mergekit-moe` 0.1.5, installed by `.ci/run` beside PyTorch) on experts btm
//! trained: it takes btm's folders as they are (tokenizer side files with a pad token, HF layout),
//! and btm and transformers read the Mixtral it writes, to the same perplexity.
//!
//! Skipped without a Python that has torch, transformers and mergekit; `BTM_REQUIRE_MERGEKIT=1`
//! (set by `.ci/run`) makes that a failure.

mod common;

use common::{btm, ok, path_with, sample, trained_expert};
use std::process::Command;

#[test]
fn mergekit_moe_takes_btms_experts_and_btm_reads_its_mixtral() {
    let Some(python) = common::torch_python() else { return };
    let path = path_with(&python);
    let has_mergekit = Command::new("mergekit-moe").env("PATH", &path).arg("--help").output().is_ok_and(|o| o.status.success());
    if !has_mergekit {
        assert!(
            std::env::var("BTM_REQUIRE_MERGEKIT").as_deref() != Ok("1"),
            "BTM_REQUIRE_MERGEKIT=1 but `mergekit-moe` is not beside {python:?}"
        );
        eprintln!("skipped: no mergekit-moe beside {python:?} (pip install mergekit==0.1.5)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (code, scripture) = (trained_expert(tmp.path(), "code"), trained_expert(tmp.path(), "scripture"));
    let config = tmp.path().join("moe.yml");
    let yaml = format!(
        "base_model: {code}\ngate_mode: hidden\ndtype: float32\nexperts_per_token: 1\nexperts:\n\
         \x20 - source_model: {code}\n    positive_prompts: [\"fn main() {{ let x = 1; }}\", \"impl Drop for Guard {{}}\"]\n\
         \x20 - source_model: {scripture}\n    positive_prompts: [\"In the beginning was the word, and the word was with the river.\"]\n",
        code = code.display(),
        scripture = scripture.display(),
    );
    std::fs::write(&config, yaml).unwrap();
    let out = tmp.path().join("mergekit-out");
    let run = Command::new("mergekit-moe").env("PATH", &path).arg(&config).arg(&out).output().unwrap();
    assert!(run.status.success(), "mergekit-moe refused btm's experts:\n{}", String::from_utf8_lossy(&run.stderr));

    // btm reads mergekit's Mixtral, and scores it as transformers does.
    let data = sample("code", "test");
    let eval = ok(btm()
        .arg("eval")
        .arg("--model")
        .arg(&out)
        .args(["--data", &data, "--seq-len", "32", "--max-docs", "2", "--json"])
        .output()
        .unwrap());
    let btm_ppl = serde_json::from_str::<serde_json::Value>(eval.lines().last().unwrap()).unwrap()["ppl"].as_f64().unwrap();
    let script = "import json, math, sys, torch\n\
        from transformers import AutoModelForCausalLM, AutoTokenizer\n\
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n\
        t = AutoTokenizer.from_pretrained(sys.argv[1])\n\
        assert type(m).__name__ == 'MixtralForCausalLM', type(m).__name__\n\
        nll, n = 0.0, 0\n\
        for line in open(sys.argv[2]).readlines()[:2]:\n\
        \x20   ids = t(json.loads(line)['text']).input_ids\n\
        \x20   for s in range(0, len(ids), 32):\n\
        \x20       w = ids[s:s + 32]\n\
        \x20       if len(w) < 2: continue\n\
        \x20       with torch.no_grad(): logits = m(torch.tensor([w])).logits[0, :-1]\n\
        \x20       nll += torch.nn.functional.cross_entropy(logits.double(), torch.tensor(w[1:]), reduction='sum').item()\n\
        \x20       n += len(w) - 1\n\
        print(math.exp(nll / n))\n";
    let torch = ok(Command::new(&python).args(["-c", script]).arg(&out).arg(&data).output().unwrap());
    let torch_ppl: f64 = torch.lines().find_map(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("transformers said: {torch}"));
    assert!((btm_ppl - torch_ppl).abs() <= 1e-3 * torch_ppl, "btm {btm_ppl} vs transformers {torch_ppl}");
}

//! `cargo bench -p btm-merger --bench merge [-- --experts N --dir DIR]`: merge N synthetic
//! ~110M-parameter experts and print peak RSS and throughput next to `cp` (see
//! `btm_merger::bench`). Prints one JSON object.

fn main() -> anyhow::Result<()> {
    let mut shape = btm_merger::bench::BenchShape::default();
    let mut dir: Option<std::path::PathBuf> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--experts" => {
                shape.experts = args.get(i + 1).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("--experts N"))?;
                i += 1;
            }
            "--dir" => {
                dir = args.get(i + 1).map(Into::into);
                i += 1;
            }
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    let tmp = match &dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let r = btm_merger::bench::run(tmp.path(), &shape)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

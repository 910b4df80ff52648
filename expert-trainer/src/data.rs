//! The data pipeline: JSONL → tokens (cached) → packed sequences → a deterministic mixture.
//! A Megatron indexed dataset (`prefix.idx`/`.bin`, [`crate::indexed`]) is already tokens:
//! it is read in place instead.
//!
//! - Every document is tokenized with the checkpoint's tokenizer as `tokenizer.json` says
//!   (its post-processor may prepend BOS) and followed by EOS; the documents of a source are
//!   concatenated into one token stream.
//! - The stream is cached as a binary file (`BTMTOK01`, a u64 count, then u32 little-endian
//!   tokens) named by the SHA-256 of the source's bytes, the tokenizer's bytes and EOS, and
//!   memory-mapped on reuse. A cache file of the wrong size is rebuilt.
//! - Sequence i of a stream is tokens `[i·T, i·T + T]` (T + 1 tokens: inputs and shifted targets).
//! - Each training sample first picks a source with probability proportional to its weight,
//!   from a generator seeded by (seed, sample index); the source then yields its sequences in
//!   a fresh permutation each epoch, seeded by (seed, source, epoch).
//!
//! So the whole stream is a function of the seed and the [`Position`] (samples drawn in total
//! and per source), which checkpoints store: resuming needs no opaque RNG state.

use crate::sources::{Documents, Format, Source, DEFAULT_TEXT_KEY};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

const MAGIC: &[u8; 8] = b"BTMTOK01";
const HEADER: usize = 16;

/// SplitMix64: a tiny generator whose output is fixed forever (unlike `StdRng`'s algorithm,
/// which a `rand` upgrade may change), so data order survives dependency updates.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for the stream named by `parts` (e.g. seed, purpose, index).
    pub fn new(parts: &[u64]) -> Self {
        let mut s = Self(0x243F_6A88_85A3_08D3);
        for &p in parts {
            s.0 ^= p;
            s.0 = s.next_u64();
        }
        s
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0), by rejection so it is unbiased.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Fisher–Yates permutation of 0..n from `rng`.
pub fn permutation(n: usize, rng: &mut SplitMix64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// A token stream, memory-mapped: btm's token cache (u32 ids after a header), or a Megatron
/// indexed dataset's `.bin` read in place (u16 or i32 ids, [`crate::indexed`]).
pub struct Tokens {
    mmap: Mmap,
    /// Bytes before the first id.
    offset: usize,
    /// Bytes per id: 4, or 2 for a u16 dataset.
    width: usize,
    len: usize,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let at = self.offset + self.width * i;
        match self.width {
            2 => u16::from_le_bytes([self.mmap[at], self.mmap[at + 1]]) as u32,
            _ => u32::from_le_bytes(self.mmap[at..at + 4].try_into().expect("4 bytes")),
        }
    }

    pub fn range(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }

    /// The token stream of a Megatron indexed dataset (`prefix.idx`/`.bin`), checked against a
    /// vocabulary of `vocab_size`.
    pub fn indexed(path: &Path, vocab_size: usize) -> Result<Self> {
        let t = crate::indexed::open(path, vocab_size)?;
        Ok(Self { mmap: t.bin, offset: 0, width: t.width, len: t.len })
    }

    pub(crate) fn open(path: &Path) -> Result<Option<Self>> {
        let Ok(file) = std::fs::File::open(path) else {
            return Ok(None);
        };
        // SAFETY: cache files are written to a temporary name and renamed into place, never
        // modified afterwards.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        if mmap.len() < HEADER || &mmap[..8] != MAGIC {
            return Ok(None);
        }
        // A count that disagrees with the file's size (or whose size overflows) marks a stale
        // or corrupt cache file: rebuilt, never indexed past its end.
        let len = u64::from_le_bytes(mmap[8..16].try_into().expect("8 bytes"));
        if len.checked_mul(4).and_then(|b| b.checked_add(HEADER as u64)) != Some(mmap.len() as u64) {
            return Ok(None);
        }
        Ok(Some(Self { mmap, offset: HEADER, width: 4, len: len as usize }))
    }
}

/// The tokenizer with what identifies it for caching.
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    /// SHA-256 of `tokenizer.json`.
    pub sha256: String,
    pub eos: u32,
}

impl TokenizerInfo {
    pub fn load(path: &Path, eos_hint: Option<u32>) -> Result<Self> {
        let bytes = btm_model::error::read_capped(path, btm_model::error::MAX_TOKENIZER_BYTES, "tokenizer file")
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        let tokenizer = btm_model::tokenizer::from_bytes(path, &bytes)?;
        let eos = match eos_hint {
            Some(e) => e,
            None => tokenizer
                .token_to_id(btm_model::tokenizer::EOS)
                .with_context(|| format!("{}: no eos_token_id in config.json and no `</s>` token", path.display()))?,
        };
        Ok(Self { tokenizer, sha256: hex::encode(Sha256::digest(&bytes)), eos })
    }
}

/// The default token cache: `tokens/` in btm's cache ([`btm_model::folder::cache_root`]).
pub fn default_cache_dir() -> PathBuf {
    btm_model::folder::cache_root().join("tokens")
}

/// Documents tokenized per parallel batch while streaming a source: bounds memory to one
/// batch of text and its token ids, whatever the source's size.
pub const DOCS_PER_BATCH: usize = 2048;

/// The token stream of a local JSONL source (plain, `.gz` or `.zst`, the `text` field): from
/// the cache, or tokenized now and cached ([`tokenize_source`]).
pub fn tokenize_cached(source: &Path, tok: &TokenizerInfo, cache_dir: &Path) -> Result<Tokens> {
    Ok(tokenize_source(&source.to_string_lossy(), Format::Jsonl, DEFAULT_TEXT_KEY, tok, cache_dir, &mut |_| {})?.tokens)
}

/// A source's token stream and what getting it took.
pub struct Tokenized {
    pub tokens: Tokens,
    /// Whether the cache already held it (nothing was read or tokenized).
    pub cached: bool,
    /// Documents tokenized now (0 when cached).
    pub documents: u64,
    /// Bytes fetched from an object store to tokenize it (0 when local or cached).
    pub fetched: u64,
}

/// Progress of one source's tokenization, handed to a callback every [`DOCS_PER_BATCH`]
/// documents.
#[derive(Debug, Clone, Copy)]
pub struct TokenizeProgress {
    pub documents: u64,
    pub tokens: u64,
    /// Text bytes tokenized so far.
    pub bytes: u64,
    pub seconds: f64,
}

/// The token stream of a text source ([`crate::sources`]: JSONL or parquet, local or in an
/// object store): from the cache, or tokenized now and cached. The cache key is the source's
/// [`Source::identity`] (content hash of local files; URL, size and ETag of objects, so a restarted
/// job finds its cache without fetching a byte), the tokenizer's bytes and EOS. Documents are
/// streamed and tokenized in parallel batches straight into the cache file, so memory stays
/// bounded by one batch however large the source is; the file is written under a temporary
/// name and renamed when complete.
pub fn tokenize_source(
    location: &str,
    format: Format,
    text_key: &str,
    tok: &TokenizerInfo,
    cache_dir: &Path,
    progress: &mut dyn FnMut(TokenizeProgress),
) -> Result<Tokenized> {
    let source = Source::open(location, format, text_key)?;
    let key = {
        let mut h = Sha256::new();
        h.update(b"btm-tokens/1\0");
        h.update(source.identity()?);
        h.update(tok.sha256.as_bytes());
        h.update(tok.eos.to_le_bytes());
        hex::encode(h.finalize())
    };
    let path = cache_dir.join(format!("{}.tokens", &key[..40]));
    if let Some(tokens) = Tokens::open(&path)? {
        return Ok(Tokenized { tokens, cached: true, documents: 0, fetched: 0 });
    }
    // Written under a temporary name (removed on any error) and renamed into place.
    let staging = btm_model::publish::StagingFile::new(&path)?;
    let mut docs = source.documents()?;
    let (count, documents) = write_tokens(location, &mut docs, tok, &staging.path, progress)?;
    if count == 0 {
        bail!("{location}: no documents");
    }
    staging.publish().with_context(|| format!("publishing {}", path.display()))?;
    let tokens = Tokens::open(&path)?.with_context(|| format!("{}: cache file unreadable right after writing", path.display()))?;
    Ok(Tokenized { tokens, cached: false, documents, fetched: docs.fetched() })
}

/// Tokenize `docs` into the cache file `dest` (header, then the ids): the number of ids and
/// of documents.
fn write_tokens(
    source: &str,
    docs: &mut Documents,
    tok: &TokenizerInfo,
    dest: &Path,
    progress: &mut dyn FnMut(TokenizeProgress),
) -> Result<(u64, u64)> {
    use rayon::prelude::*;
    use std::io::{Seek, SeekFrom};
    let started = std::time::Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?);
    w.write_all(MAGIC)?;
    w.write_all(&0u64.to_le_bytes())?;
    let (mut count, mut ndocs, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        let batch: Vec<String> = docs.by_ref().take(DOCS_PER_BATCH).collect::<Result<_>>()?;
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Vec<u32>> = batch
            .par_iter()
            // Through btm_model's encode, which names a panic of the tokenizers crate as an error.
            .map(|t| btm_model::tokenizer::encode(&tok.tokenizer, t))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("tokenizing {source} (documents {ndocs}..): {e}"))?;
        for ids in encoded {
            for id in ids.iter().chain(std::iter::once(&tok.eos)) {
                w.write_all(&id.to_le_bytes())?;
            }
            count += ids.len() as u64 + 1;
        }
        ndocs += batch.len() as u64;
        bytes += batch.iter().map(|t| t.len() as u64).sum::<u64>();
        progress(TokenizeProgress { documents: ndocs, tokens: count, bytes, seconds: started.elapsed().as_secs_f64() });
    }
    let mut f = w.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {e}", dest.display()))?;
    f.seek(SeekFrom::Start(MAGIC.len() as u64))?;
    f.write_all(&count.to_le_bytes())?;
    f.sync_all()?;
    Ok((count, ndocs))
}

/// A token stream cut into sequences of `seq_len + 1` tokens with stride `seq_len`.
pub struct Packed {
    pub tokens: Tokens,
    pub seq_len: usize,
}

impl Packed {
    pub fn new(tokens: Tokens, seq_len: usize, what: &str) -> Result<Self> {
        if tokens.len() < seq_len + 1 {
            bail!("{what}: {} tokens, fewer than seq_len + 1 = {}", tokens.len(), seq_len + 1);
        }
        Ok(Self { tokens, seq_len })
    }

    pub fn num_sequences(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    pub fn sequence(&self, i: usize) -> Vec<u32> {
        self.tokens.range(i * self.seq_len, self.seq_len + 1)
    }
}

/// Where the training stream stands: the only data state a checkpoint needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Sequences drawn so far, in total.
    pub samples: u64,
    /// Sequences drawn so far from each source.
    pub drawn: Vec<u64>,
}

/// Weighted, shuffled, endless sampling from several packed sources.
pub struct Mixture {
    sources: Vec<Packed>,
    /// Cumulative normalised weights.
    cumulative: Vec<f64>,
    seed: u64,
    /// The current epoch's permutation of each source.
    perms: Vec<Option<(u64, Vec<u32>)>>,
}

const PICK_SOURCE: u64 = 1;
const SHUFFLE: u64 = 2;

impl Mixture {
    pub fn new(sources: Vec<Packed>, weights: &[f64], seed: u64) -> Self {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        let perms = vec![None; sources.len()];
        Self { sources, cumulative, seed, perms }
    }

    pub fn num_sources(&self) -> usize {
        self.sources.len()
    }

    /// The next training sequence (seq_len + 1 tokens) and the index of the source it came
    /// from, advancing `pos`.
    pub fn next(&mut self, pos: &mut Position) -> (Vec<u32>, usize) {
        pos.drawn.resize(self.sources.len(), 0);
        let s = if self.sources.len() == 1 {
            0
        } else {
            let u = SplitMix64::new(&[self.seed, PICK_SOURCE, pos.samples]).next_f64();
            self.cumulative.iter().position(|&c| u < c).unwrap_or(self.sources.len() - 1)
        };
        let k = pos.drawn[s];
        let n = self.sources[s].num_sequences() as u64;
        let epoch = k / n;
        let fresh = !matches!(&self.perms[s], Some((e, _)) if *e == epoch);
        if fresh {
            let mut rng = SplitMix64::new(&[self.seed, SHUFFLE, s as u64, epoch]);
            self.perms[s] = Some((epoch, permutation(n as usize, &mut rng)));
        }
        let idx = self.perms[s].as_ref().expect("permutation").1[(k % n) as usize];
        pos.drawn[s] += 1;
        pos.samples += 1;
        (self.sources[s].sequence(idx as usize), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> TokenizerInfo {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tokenizer.json");
        TokenizerInfo::load(&p, None).unwrap()
    }

    fn write_jsonl(dir: &Path, name: &str, docs: &[&str]) -> PathBuf {
        let p = dir.join(name);
        let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    #[test]
    fn tokens_are_cached_with_eos_between_documents() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fixture_tokenizer();
        let src = write_jsonl(dir.path(), "a.jsonl", &["hello world", "the end"]);
        let cache = dir.path().join("cache");
        let t = tokenize_cached(&src, &tok, &cache).unwrap();
        let mut want = btm_model::tokenizer::encode(&tok.tokenizer, "hello world").unwrap();
        want.push(tok.eos);
        want.extend(btm_model::tokenizer::encode(&tok.tokenizer, "the end").unwrap());
        want.push(tok.eos);
        assert_eq!(t.range(0, t.len()), want);
        let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(files.len(), 1, "one cache file per source");
        let cached = files[0].as_ref().unwrap().path();
        // Reuse: a second call maps the same file (a corrupt one would be rebuilt).
        let again = tokenize_cached(&src, &tok, &cache).unwrap();
        assert_eq!(again.range(0, again.len()), want);
        std::fs::write(&cached, b"BTMTOK01garbage").unwrap();
        let rebuilt = tokenize_cached(&src, &tok, &cache).unwrap();
        assert_eq!(rebuilt.range(0, rebuilt.len()), want);
        // Different content, different key.
        let src2 = write_jsonl(dir.path(), "a.jsonl", &["hello world!"]);
        tokenize_cached(&src2, &tok, &cache).unwrap();
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    }

    /// More documents than one streaming batch, given plain, gzip- and zstd-compressed: one
    /// token stream (so training on either is the same run); a bad line is named with its
    /// number and leaves nothing in the cache.
    #[test]
    fn compressed_sources_give_the_same_stream_and_bad_lines_leave_no_cache() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let tok = fixture_tokenizer();
        let docs: Vec<String> = (0..DOCS_PER_BATCH + 37).map(|i| format!("document {i}: the river runs {} times", i % 17)).collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let plain = write_jsonl(dir.path(), "d.jsonl", &refs);
        let bytes = std::fs::read(&plain).unwrap();
        let gz = dir.path().join("d.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("d.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(&bytes[..], 1).unwrap()).unwrap();
        let cache = dir.path().join("cache");
        let want = tokenize_cached(&plain, &tok, &cache).unwrap();
        let want = want.range(0, want.len());
        assert_eq!(want.iter().filter(|&&t| t == tok.eos).count(), docs.len());
        for src in [&gz, &zst] {
            let t = tokenize_cached(src, &tok, &cache).unwrap();
            assert!(t.range(0, t.len()) == want, "{}", src.display());
        }
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, format!("{}\n{{\"txt\": 1}}\n", String::from_utf8_lossy(&bytes))).unwrap();
        let before = std::fs::read_dir(&cache).unwrap().count();
        let err = format!("{:#}", tokenize_cached(&bad, &tok, &cache).err().unwrap());
        assert!(err.contains(&format!("bad.jsonl:{}: no `text` field", docs.len() + 1)), "{err}");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), before, "nothing half-written stays in the cache");
    }

    #[test]
    fn permutations_are_deterministic_and_complete() {
        let p = permutation(100, &mut SplitMix64::new(&[7, 2, 0, 0]));
        let q = permutation(100, &mut SplitMix64::new(&[7, 2, 0, 0]));
        let r = permutation(100, &mut SplitMix64::new(&[7, 2, 0, 1]));
        assert_eq!(p, q);
        assert_ne!(p, r);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
    }

    #[test]
    fn mixture_follows_weights_and_resumes_from_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fixture_tokenizer();
        let cache = dir.path().join("cache");
        let long: Vec<String> = (0..60).map(|i| format!("document number {i} says something")).collect();
        let docs: Vec<&str> = long.iter().map(String::as_str).collect();
        let a = write_jsonl(dir.path(), "a.jsonl", &docs);
        let b = write_jsonl(dir.path(), "b.jsonl", &docs[..30]);
        let packed = |p: &Path| Packed::new(tokenize_cached(p, &tok, &cache).unwrap(), 8, "src").unwrap();
        let mut mix = Mixture::new(vec![packed(&a), packed(&b)], &[3.0, 1.0], 5);
        let mut pos = Position::default();
        let first: Vec<Vec<u32>> = (0..400).map(|_| mix.next(&mut pos).0).collect();
        assert_eq!(pos.samples, 400);
        let share = pos.drawn[0] as f64 / 400.0;
        assert!((share - 0.75).abs() < 0.07, "source 0 share {share}");
        assert!(first.iter().all(|s| s.len() == 9));

        // Restarting from a saved position continues the same stream.
        let mut pos2 = Position::default();
        let mut mix2 = Mixture::new(vec![packed(&a), packed(&b)], &[3.0, 1.0], 5);
        for _ in 0..123 {
            mix2.next(&mut pos2);
        }
        let mut mix3 = Mixture::new(vec![packed(&a), packed(&b)], &[3.0, 1.0], 5);
        let mut pos3 = pos2.clone();
        for s in &first[123..] {
            assert_eq!(&mix3.next(&mut pos3).0, s);
        }
        // Another seed, another order.
        let mut mix4 = Mixture::new(vec![packed(&a), packed(&b)], &[3.0, 1.0], 6);
        let mut pos4 = Position::default();
        let other: Vec<Vec<u32>> = (0..20).map(|_| mix4.next(&mut pos4).0).collect();
        assert_ne!(other, first[..20].to_vec());
    }

    /// A cache file whose count overflows or disagrees with its size is stale (rebuilt), never
    /// read past its end; one that matches reads.
    #[test]
    fn cache_files_with_mutated_counts_are_rebuilt_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tokens");
        let file = |count: u64, ids: &[u32]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            ids.iter().for_each(|id| b.extend_from_slice(&id.to_le_bytes()));
            std::fs::write(&p, b).unwrap();
        };
        for count in [u64::MAX, 1 << 62, (u64::MAX - 16) / 4 + 1, 3] {
            file(count, &[1, 2]);
            assert!(Tokens::open(&p).unwrap().is_none(), "count {count}");
        }
        file(2, &[1, 2]);
        assert_eq!(Tokens::open(&p).unwrap().unwrap().range(0, 2), vec![1, 2]);
    }

    /// A tokenizer.json past its bound is refused before it is read (a sparse file).
    #[test]
    fn an_oversized_tokenizer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::File::create(&p).unwrap().set_len(btm_model::error::MAX_TOKENIZER_BYTES + 1).unwrap();
        let err = format!("{:#}", TokenizerInfo::load(&p, Some(1)).err().unwrap());
        assert!(err.contains("tokenizer file of 268435457 bytes exceeds the limit of 256 MiB (268435456 bytes)"), "{err}");
    }

    #[test]
    fn too_short_a_source_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tok = fixture_tokenizer();
        let src = write_jsonl(dir.path(), "a.jsonl", &["hi"]);
        let t = tokenize_cached(&src, &tok, &dir.path().join("c")).unwrap();
        let err = Packed::new(t, 64, "data.train[0]").err().unwrap().to_string();
        assert!(err.contains("fewer than seq_len + 1 = 65"), "{err}");
    }
}

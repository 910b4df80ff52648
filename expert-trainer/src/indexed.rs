//! Megatron-LM indexed datasets (`prefix.bin` + `prefix.idx`), already tokenized: read in place,
//! memory-mapped, as one token stream (the documents in order, concatenated).
//!
//! The layout, as Megatron-Core's `IndexedDataset` (`MMIDIDX`, version 1) writes it:
//!
//! ```text
//! prefix.idx:  b"MMIDIDX\0\0"   u64 version = 1   u8 dtype code
//!              u64 S (sequences)   u64 D (document indices, = documents + 1)
//!              i32 lengths[S]      i64 byte pointers[S] into .bin      i64 document_indices[D]
//! prefix.bin:  the sequences' token ids back to back, each `dtype`
//! ```
//!
//! dtype codes: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16; token streams use 8 (u16,
//! vocabularies under 65 500) or 4 (i32). btm uses the ids as stored: Megatron's
//! `preprocess_data.py --append-eod` ends each document with EOD, as btm's own tokenization ends
//! each with EOS. Every header field and size is checked against the `.bin`, and every id
//! against the model's vocabulary, before training starts.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
const VERSION: u64 = 1;
/// Megatron's dtype codes for the two token widths.
const DTYPE_U16: u8 = 8;
const DTYPE_I32: u8 = 4;

/// Whether `path` names an indexed dataset (its `.idx` or `.bin`).
pub fn is_indexed(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("idx") | Some("bin"))
}

/// The dataset prefix of `prefix.idx` or `prefix.bin`.
pub fn prefix(path: &Path) -> PathBuf {
    path.with_extension("")
}

/// An indexed dataset's token stream, mapped from its `.bin`.
#[derive(Debug)]
pub struct IndexedTokens {
    pub bin: Mmap,
    /// Bytes per id: 2 (u16) or 4 (i32).
    pub width: usize,
    pub len: usize,
    pub documents: usize,
}

/// Open `prefix.idx`/`prefix.bin`, check the index against the data, and every id against a
/// vocabulary of `vocab_size`.
pub fn open(path: &Path, vocab_size: usize) -> Result<IndexedTokens> {
    let prefix = prefix(path);
    let (idx_path, bin_path) = (prefix.with_extension("idx"), prefix.with_extension("bin"));
    let idx = std::fs::read(&idx_path).with_context(|| format!("reading {}", idx_path.display()))?;
    let bad = |why: String| anyhow::anyhow!("{}: {why}", idx_path.display());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = idx.get(at..at + n).ok_or_else(|| bad(format!("ends at byte {} inside its header or tables", idx.len())))?;
        at += n;
        Ok(s)
    };
    if take(9)? != MAGIC {
        bail!("{}: not a Megatron indexed dataset index (no MMIDIDX header)", idx_path.display());
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let version = u64_at(take(8)?);
    if version != VERSION {
        return Err(bad(format!("index version {version}, expected {VERSION}")));
    }
    let width = match take(1)?[0] {
        DTYPE_U16 => 2,
        DTYPE_I32 => 4,
        other => return Err(bad(format!("token dtype code {other}: btm reads u16 (8) and i32 (4) token ids"))),
    };
    let sequences = u64_at(take(8)?) as usize;
    let doc_indices = u64_at(take(8)?) as usize;
    let lengths: Vec<usize> = take(4 * sequences)?.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4")) as usize).collect();
    let pointers: Vec<usize> =
        take(8 * sequences)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8")) as usize).collect();
    let docs: Vec<usize> = take(8 * doc_indices)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8")) as usize).collect();
    if at != idx.len() {
        return Err(bad(format!("{} bytes after its tables", idx.len() - at)));
    }
    // Sequences lie back to back in the .bin, in order.
    let mut expected = 0usize;
    for (i, (&len, &ptr)) in lengths.iter().zip(&pointers).enumerate() {
        if ptr != expected {
            return Err(bad(format!("sequence {i} starts at byte {ptr} of the .bin, expected {expected}")));
        }
        expected += len * width;
    }
    if docs.first() != Some(&0) || docs.last() != Some(&sequences) || docs.windows(2).any(|w| w[0] > w[1]) {
        return Err(bad(format!("document indices must rise from 0 to the {sequences} sequences")));
    }
    let file = std::fs::File::open(&bin_path).with_context(|| format!("opening {}", bin_path.display()))?;
    // SAFETY: the dataset is read-only input; btm never writes it.
    let bin = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", bin_path.display()))?;
    if bin.len() != expected {
        bail!("{}: {} bytes, but {} says its sequences take {expected}", bin_path.display(), bin.len(), idx_path.display());
    }
    let tokens = IndexedTokens { len: expected / width, width, documents: docs.len().saturating_sub(1), bin };
    if let Some((i, id)) = (0..tokens.len).map(|i| (i, tokens.get(i))).find(|&(_, id)| id as usize >= vocab_size) {
        bail!("{}: token {i} is id {id}, beyond the model's vocabulary of {vocab_size}", bin_path.display());
    }
    Ok(tokens)
}

impl IndexedTokens {
    /// Token `i` of the stream.
    pub fn get(&self, i: usize) -> u32 {
        let at = i * self.width;
        match self.width {
            2 => u16::from_le_bytes([self.bin[at], self.bin[at + 1]]) as u32,
            _ => i32::from_le_bytes(self.bin[at..at + 4].try_into().expect("4 bytes")) as u32,
        }
    }
}

/// Write `documents` as the indexed dataset `prefix.bin`/`.idx` (one sequence per document,
/// u16 ids when every id fits, else i32), as Megatron's builder does: for tests and for
/// turning a btm token stream into a dataset other engines read.
pub fn write(prefix: &Path, documents: &[Vec<u32>]) -> Result<()> {
    let wide = documents.iter().flatten().any(|&id| id > u16::MAX as u32);
    let width = if wide { 4 } else { 2 };
    let mut bin = Vec::new();
    let mut idx = Vec::new();
    idx.extend_from_slice(MAGIC);
    idx.extend_from_slice(&VERSION.to_le_bytes());
    idx.push(if wide { DTYPE_I32 } else { DTYPE_U16 });
    idx.extend_from_slice(&(documents.len() as u64).to_le_bytes());
    idx.extend_from_slice(&(documents.len() as u64 + 1).to_le_bytes());
    for d in documents {
        idx.extend_from_slice(&(d.len() as i32).to_le_bytes());
    }
    let mut pointer = 0i64;
    for d in documents {
        idx.extend_from_slice(&pointer.to_le_bytes());
        pointer += (d.len() * width) as i64;
        for &id in d {
            if wide {
                bin.extend_from_slice(&(id as i32).to_le_bytes());
            } else {
                bin.extend_from_slice(&(id as u16).to_le_bytes());
            }
        }
    }
    for i in 0..=documents.len() {
        idx.extend_from_slice(&(i as i64).to_le_bytes());
    }
    std::fs::write(prefix.with_extension("bin"), bin)?;
    std::fs::write(prefix.with_extension("idx"), idx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_dataset_reads_back_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("corpus_text_document");
        let docs = vec![vec![5u32, 6, 7, 1], vec![9, 1], vec![300, 2, 1]];
        write(&p, &docs).unwrap();
        let t = open(&p.with_extension("idx"), 320).unwrap();
        assert_eq!((t.width, t.len, t.documents), (2, 9, 3));
        let stream: Vec<u32> = (0..t.len).map(|i| t.get(i)).collect();
        assert_eq!(stream, docs.concat());
        // Wide ids take i32.
        let wide = dir.path().join("wide");
        write(&wide, &[vec![70_000, 3]]).unwrap();
        let w = open(&wide.with_extension("bin"), 80_000).unwrap();
        assert_eq!((w.width, w.get(0), w.get(1)), (4, 70_000, 3));
        // Ids beyond the vocabulary, a .bin that disagrees with its index, a foreign file.
        let e = open(&p.with_extension("idx"), 100).unwrap_err().to_string();
        assert!(e.contains("token 6 is id 300, beyond the model's vocabulary of 100"), "{e}");
        std::fs::write(p.with_extension("bin"), [0u8; 10]).unwrap();
        let e = open(&p.with_extension("idx"), 320).unwrap_err().to_string();
        assert!(e.contains("10 bytes, but") && e.contains("take 18"), "{e}");
        std::fs::write(p.with_extension("idx"), b"not an index").unwrap();
        let e = open(&p.with_extension("idx"), 320).unwrap_err().to_string();
        assert!(e.contains("no MMIDIDX header"), "{e}");
    }
}

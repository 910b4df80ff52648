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

/// What an `.idx` file says of its `.bin`, checked against itself ([`parse_index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    /// Bytes per id: 2 (u16) or 4 (i32).
    pub width: usize,
    /// Sequences in the `.bin`.
    pub sequences: u64,
    /// Documents (document indices less one).
    pub documents: usize,
    /// The `.bin`'s size its sequences imply.
    pub bin_bytes: u64,
}

/// Parse and check the bytes of an `.idx` file (`name` is what errors name) without allocating:
/// its header's counts against the bytes that follow it, before any table is read; every
/// sequence length and pointer for sign and overflow, the sequences back to back; the document
/// indices rising from 0 to the number of sequences.
pub fn parse_index(name: &Path, idx: &[u8]) -> Result<IndexHeader> {
    let bad = |why: String| anyhow::anyhow!("{}: {why}", name.display());
    if !idx.starts_with(MAGIC) {
        bail!("{}: not a Megatron indexed dataset index (no MMIDIDX header)", name.display());
    }
    // Magic, version, dtype code and the two counts: 9 + 8 + 1 + 8 + 8 bytes.
    if idx.len() < 34 {
        return Err(bad(format!("ends at byte {} inside its header", idx.len())));
    }
    let u64_at = |at: usize| u64::from_le_bytes(idx[at..at + 8].try_into().expect("8 bytes"));
    let version = u64_at(9);
    if version != VERSION {
        return Err(bad(format!("index version {version}, expected {VERSION}")));
    }
    let width = match idx[17] {
        DTYPE_U16 => 2,
        DTYPE_I32 => 4,
        other => return Err(bad(format!("token dtype code {other}: btm reads u16 (8) and i32 (4) token ids"))),
    };
    let (sequences, doc_indices) = (u64_at(18), u64_at(26));
    // The tables' size from the header's counts, checked against the bytes there are before
    // any table is touched: 4 + 8 bytes per sequence, 8 per document index.
    let tables = sequences.checked_mul(12).and_then(|s| doc_indices.checked_mul(8).and_then(|d| s.checked_add(d)));
    let left = (idx.len() - 34) as u64;
    match tables {
        Some(t) if t == left => {}
        Some(t) if t < left => return Err(bad(format!("{} bytes after its tables", left - t))),
        _ => {
            return Err(bad(format!(
                "ends at byte {} inside its tables ({sequences} sequences and {doc_indices} document indices need more)",
                idx.len()
            )))
        }
    }
    let (lengths, rest) = idx[34..].split_at(4 * sequences as usize);
    let (pointers, docs) = rest.split_at(8 * sequences as usize);
    let bin_bytes = check_sequences(lengths, pointers, width as u64).map_err(bad)?;
    let docs = docs.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
    let (mut first, mut last, mut rising) = (None, None, true);
    for d in docs {
        first.get_or_insert(d);
        rising &= last.is_none_or(|l| l <= d);
        last = Some(d);
    }
    if first != Some(0) || last.and_then(|l| u64::try_from(l).ok()) != Some(sequences) || !rising {
        return Err(bad(format!("document indices must rise from 0 to the {sequences} sequences")));
    }
    Ok(IndexHeader { width, sequences, documents: doc_indices as usize - 1, bin_bytes })
}

/// The `.bin` size that the sequence `lengths` (i32 each) and byte `pointers` (i64 each) of an
/// index imply, once each length is non-negative and each sequence starts where the one before
/// it ends; else why not.
fn check_sequences(lengths: &[u8], pointers: &[u8], width: u64) -> std::result::Result<u64, String> {
    let mut expected = 0u64;
    for (i, (len, ptr)) in lengths.chunks_exact(4).zip(pointers.chunks_exact(8)).enumerate() {
        let len = i32::from_le_bytes(len.try_into().expect("4 bytes"));
        let ptr = i64::from_le_bytes(ptr.try_into().expect("8 bytes"));
        if u64::try_from(ptr) != Ok(expected) {
            return Err(format!("sequence {i} starts at byte {ptr} of the .bin, expected {expected}"));
        }
        let Ok(len) = u64::try_from(len) else {
            return Err(format!("sequence {i} has a negative length {len}"));
        };
        // len < 2^31 and width ≤ 4, so only the sum can overflow.
        expected = expected.checked_add(len * width).ok_or_else(|| format!("sequence {i} ends beyond 2^64 bytes"))?;
    }
    Ok(expected)
}

/// Open `prefix.idx`/`prefix.bin`, check the index against the data ([`parse_index`], then the
/// `.bin`'s size), and every id against a vocabulary of `vocab_size`.
pub fn open(path: &Path, vocab_size: usize) -> Result<IndexedTokens> {
    let prefix = prefix(path);
    let (idx_path, bin_path) = (prefix.with_extension("idx"), prefix.with_extension("bin"));
    // The index holds 12 bytes per sequence; it is read whole, as big as the file is.
    let idx = std::fs::read(&idx_path).with_context(|| format!("reading {}", idx_path.display()))?;
    let header = parse_index(&idx_path, &idx)?;
    drop(idx);
    let file = std::fs::File::open(&bin_path).with_context(|| format!("opening {}", bin_path.display()))?;
    // SAFETY: the dataset is read-only input; btm never writes it.
    let bin = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", bin_path.display()))?;
    let expected = header.bin_bytes;
    if bin.len() as u64 != expected {
        bail!("{}: {} bytes, but {} says its sequences take {expected}", bin_path.display(), bin.len(), idx_path.display());
    }
    let width = header.width;
    let tokens = IndexedTokens { len: bin.len() / width, width, documents: header.documents, bin };
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

    /// An index of one sequence of `len` ids at `ptr` and document indices `docs`, with the
    /// counts `sequences` and `doc_indices` as the header claims them.
    fn index(sequences: u64, doc_indices: u64, len: i32, ptr: i64, docs: &[i64]) -> Vec<u8> {
        let mut idx = MAGIC.to_vec();
        idx.extend_from_slice(&VERSION.to_le_bytes());
        idx.push(DTYPE_U16);
        idx.extend_from_slice(&sequences.to_le_bytes());
        idx.extend_from_slice(&doc_indices.to_le_bytes());
        idx.extend_from_slice(&len.to_le_bytes());
        idx.extend_from_slice(&ptr.to_le_bytes());
        docs.iter().for_each(|d| idx.extend_from_slice(&d.to_le_bytes()));
        idx
    }

    fn parse_err(idx: &[u8]) -> String {
        parse_index(Path::new("d.idx"), idx).unwrap_err().to_string()
    }

    /// Counts, lengths, pointers and document indices from a mutated index end in named errors
    /// before anything their size is allocated.
    #[test]
    fn mutated_indexes_are_named_without_allocating() {
        assert_eq!(parse_index(Path::new("d.idx"), &index(1, 2, 3, 0, &[0, 1])).unwrap().bin_bytes, 6);
        // Counts whose tables overflow u64, or need more bytes than the file holds.
        for (s, d) in [(1u64 << 62, 2), (1, u64::MAX), (1 << 40, 2)] {
            let e = parse_err(&index(s, d, 3, 0, &[0, 1]));
            assert!(e.starts_with("d.idx: ends at byte 62 inside its tables"), "{e}");
        }
        assert_eq!(parse_err(&index(1, 1, 3, 0, &[0, 1])), "d.idx: 8 bytes after its tables");
        assert_eq!(parse_err(&index(1, 2, -3, 0, &[0, 1])), "d.idx: sequence 0 has a negative length -3");
        assert_eq!(parse_err(&index(1, 2, 3, -8, &[0, 1])), "d.idx: sequence 0 starts at byte -8 of the .bin, expected 0");
        assert!(parse_err(&index(1, 2, 3, 0, &[0, -1])).contains("document indices must rise from 0 to the 1 sequences"));
        assert!(parse_err(&index(1, 2, 3, 0, &[i64::MIN, 1])).contains("document indices must rise"));
        assert_eq!(parse_err(&index(1, 2, 3, 0, &[0, 1])[..30]), "d.idx: ends at byte 30 inside its header");
        assert!(parse_err(b"\x00garbage\xff").contains("no MMIDIDX header"));
    }
}

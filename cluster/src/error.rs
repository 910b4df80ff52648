//! The errors a user can cause, by name, so that callers (and tests) can tell them apart:
//! every function returns `anyhow::Result`, with one of these at the root or as context.

/// Bad input to clustering.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// More clusters asked for than documents to fit them on.
    #[error(
        "{k} clusters asked for but only {documents} documents to fit them on (k must not exceed the documents, or the --sample size)"
    )]
    TooFewDocuments {
        /// Clusters asked for.
        k: usize,
        /// Documents available.
        documents: usize,
    },
    /// The inputs hold no document.
    #[error("no documents in {inputs}")]
    EmptyInput {
        /// The inputs, as given.
        inputs: String,
    },
    /// A document lacks the text field (JSONL) or the text column (parquet).
    #[error("{location}: no text under `{key}` (name the field or column with --text-key)")]
    MissingTextKey {
        /// The source.
        location: String,
        /// The key looked for.
        key: String,
    },
    /// No term survives stop words and `min_df`: nothing to cluster by.
    #[error("no term is left in {documents} documents after stop words and min_df = {min_df}: nothing to cluster by")]
    EmptyVocabulary {
        /// Documents fitted on.
        documents: usize,
        /// The smallest document frequency a term needed.
        min_df: usize,
    },
    /// A folder without a readable clusterer.
    #[error("{path}: not a clusterer ({reason})")]
    NotAClusterer {
        /// The folder or file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

//! Test documents shared by the modules' tests.

/// Four topics of distinct words, `n` documents each, interleaved (document `i` is of topic
/// `i % 4`); also each document's topic.
pub fn topical_docs(n: usize) -> (Vec<String>, Vec<usize>) {
    let topics = [
        ["psalm", "lord", "thee", "thou", "shepherd", "israel"],
        ["def", "return", "self", "import", "lambda", "yield"],
        ["noun", "verb", "adjective", "plural", "etymology", "synonym"],
        ["kernel", "compiler", "protocol", "unix", "packet", "bytes"],
    ];
    let mut rng = btm_trainer::data::SplitMix64::new(&[11]);
    (0..4 * n)
        .map(|i| {
            let t = i % 4;
            let words: Vec<&str> = (0..30).map(|_| topics[t][rng.below(6) as usize]).collect();
            (words.join(" "), t)
        })
        .unzip()
}

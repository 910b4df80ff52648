//! Words of a document, as c-BTM's tf-idf vectorizer sees them (Gururangan et al. 2023, §2.1;
//! `metaseq/scripts/train_clusterer.py` in the reference code): scikit-learn's
//! `TfidfVectorizer` defaults (lower-cased, runs of two or more word characters), its English
//! stop words removed, and every token that starts with a digit dropped (the reference maps it
//! to `#NUMBER`, which it then lists as a stop word).
//!
//! Invariant: the same text always yields the same terms in the same order; nothing here
//! depends on a vocabulary, so fitting and placing tokenize alike.

/// scikit-learn's `ENGLISH_STOP_WORDS` (the Glasgow Information Retrieval Group's list, BSD-3),
/// in alphabetical order for binary search: its 317 words less the three no token can match
/// ("couldn't", "hasn't", "no one").
const STOP_WORDS: &str = "\
    a about above across after afterwards again against all almost alone along already also although always am \
    among amongst amount an and another any anyhow anyone anything anyway anywhere are around as at back be \
    became because become becomes becoming been before beforehand behind being below beside besides between \
    beyond bill both bottom but by call can cannot cant co con could cry de describe detail do done down due \
    during each eg eight either eleven else elsewhere empty enough etc even ever every everyone everything \
    everywhere except few fifteen fifty fill find fire first five for former formerly forty found four from front \
    full further get give go had has have he hence her here hereafter hereby herein hereupon hers herself him \
    himself his how however hundred i ie if in inc indeed interest into is it its itself keep last latter \
    latterly least less ltd made many may me meanwhile might mill mine more moreover most mostly move much must \
    my myself name namely neither never nevertheless next nine no nobody none nor not nothing now nowhere of off \
    often on once one only onto or other others otherwise our ours ourselves out over own part per perhaps please \
    put rather re same see seem seemed seeming seems serious several she should show side since sincere six sixty \
    so some somehow someone something sometime sometimes somewhere still such system take ten than that the their \
    them themselves then thence there thereafter thereby therefore therein thereupon these they thick thin third \
    this those though three through throughout thru thus to together too top toward towards twelve twenty two un \
    under until up upon us very via was we well were what whatever when whence whenever where whereafter whereas \
    whereby wherein whereupon wherever whether which while whither who whoever whole whom whose why will with \
    within without would yet you your yours yourself yourselves";

/// [`STOP_WORDS`], split once.
fn stop_words() -> &'static [&'static str] {
    static WORDS: std::sync::OnceLock<Vec<&str>> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| STOP_WORDS.split_whitespace().collect())
}

/// Whether `word` (lower case) is an English stop word.
pub fn is_stop_word(word: &str) -> bool {
    stop_words().binary_search(&word).is_ok()
}

/// Call `f` with each term of `text`, in order: maximal runs of word characters (alphanumeric
/// or `_`, scikit-learn's `\w`) of at least two characters, lower-cased, that are neither stop
/// words nor start with a digit.
pub fn for_each_term(text: &str, mut f: impl FnMut(&str)) {
    let mut token = String::new();
    let mut chars = 0usize;
    let mut emit = |token: &mut String, chars: &mut usize| {
        let numeric = token.chars().next().is_some_and(char::is_numeric);
        if *chars >= 2 && !numeric && !is_stop_word(token) {
            f(token);
        }
        token.clear();
        *chars = 0;
    };
    for c in text.chars() {
        if c.is_ascii() {
            // The common case, without Unicode tables.
            if c.is_ascii_alphanumeric() || c == '_' {
                token.push(c.to_ascii_lowercase());
                chars += 1;
            } else if chars > 0 {
                emit(&mut token, &mut chars);
            }
        } else if c.is_alphanumeric() {
            token.extend(c.to_lowercase());
            chars += 1;
        } else if chars > 0 {
            emit(&mut token, &mut chars);
        }
    }
    if chars > 0 {
        emit(&mut token, &mut chars);
    }
}

/// The terms of `text`, in order (see [`for_each_term`]).
pub fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for_each_term(text, |t| out.push(t.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_words_are_sorted_so_binary_search_finds_each() {
        assert!(stop_words().windows(2).all(|w| w[0] < w[1]));
        assert!(stop_words().iter().all(|w| is_stop_word(w)));
        assert_eq!(stop_words().len(), 314);
    }

    #[test]
    fn terms_are_lowercased_word_runs_without_stop_words_numbers_or_single_letters() {
        let got = terms("The QUICK brown_fox, a 2nd x jumps—over Ünïcode 42 v2 the_end");
        assert_eq!(got, ["quick", "brown_fox", "jumps", "ünïcode", "v2", "the_end"]);
        assert!(terms("").is_empty());
        assert!(terms("a I 1 22 of").is_empty());
    }
}

//! YAML read with bounds: pipeline files and job specs come from users and other tools, and
//! YAML's aliases let a few hundred bytes stand for billions of nodes ("billion laughs").
//! serde_yaml bounds the number of alias jumps (100 per event) and the nesting (128), but not
//! what one jump expands to: an alias to a long anchored list, repeated, still multiplies.
//! [`from_str`] first walks the document as serde_yaml expands it, counting nodes and depth,
//! and stops with a named error at [`MAX_NODES`] or [`MAX_DEPTH`] before anything is built.

use serde::de::{DeserializeOwned, DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// The longest YAML text read: a pipeline of 1,024 domains is a few hundred KiB.
pub const MAX_BYTES: usize = 8 << 20;

/// The most nodes (scalars, lists and mappings) a document may have once its aliases are
/// expanded: far above any pipeline's (a 1,024-domain one has tens of thousands), far below
/// what would exhaust memory.
pub const MAX_NODES: usize = 1 << 20;

/// The deepest nesting of lists and mappings: pipelines nest a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// Parse `text` as `T` (as `serde_yaml::from_str`), after checking [`MAX_BYTES`], and that
/// the document, aliases expanded, stays within [`MAX_NODES`] and [`MAX_DEPTH`]. The errors
/// are serde_yaml's, with its location where it has one.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_yaml::Error> {
    check(text)?;
    serde_yaml::from_str(text)
}

/// A YAML file's text, refused (as `InvalidData`) past [`MAX_BYTES`] without reading more.
pub fn read_to_string(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_BYTES as u64 + 1).read_to_string(&mut text)?;
    if text.len() > MAX_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("over btm's limit of {MAX_BYTES} bytes for YAML")));
    }
    Ok(text)
}

/// The bounds [`from_str`] checks, alone.
pub fn check(text: &str) -> Result<(), serde_yaml::Error> {
    if text.len() > MAX_BYTES {
        return Err(serde_yaml::Error::custom(format!("YAML of {} bytes, over btm's limit of {MAX_BYTES}", text.len())));
    }
    let nodes = Cell::new(0);
    let tripped = Cell::new(false);
    match (Counter { nodes: &nodes, tripped: &tripped, depth: 0 }).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Err(e) if tripped.get() => Err(e),
        // serde_yaml's own bounds, met while counting: no need to meet them twice.
        Err(e) if e.to_string().contains("limit exceeded") => Err(e),
        // Any other error (a syntax error, a duplicate key) is left to the real parse, which
        // reports it as it always has.
        _ => Ok(()),
    }
}

/// Counts the nodes serde_yaml hands out, aliases expanded, and builds nothing.
#[derive(Clone, Copy)]
struct Counter<'a> {
    nodes: &'a Cell<usize>,
    tripped: &'a Cell<bool>,
    depth: usize,
}

impl Counter<'_> {
    fn node<E: serde::de::Error>(&self) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        if self.nodes.get() > MAX_NODES {
            self.tripped.set(true);
            return Err(E::custom(format!("more than {MAX_NODES} YAML nodes once aliases are expanded (an alias bomb?)")));
        }
        Ok(())
    }

    /// The counter for the children of a list or mapping at this one's depth.
    fn child<E: serde::de::Error>(&self) -> Result<Self, E> {
        self.node()?;
        if self.depth + 1 > MAX_DEPTH {
            self.tripped.set(true);
            return Err(E::custom(format!("YAML nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(Counter { depth: self.depth + 1, ..*self })
    }
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.node()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.node()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.node()
    }

    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<(), E> {
        self.node()
    }

    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<(), E> {
        self.node()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.node()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.node()
    }

    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.node()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.node()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.node()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let child = self.child()?;
        while seq.next_element_seed(child)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let child = self.child()?;
        while map.next_key_seed(child)?.is_some() {
            map.next_value_seed(child)?;
        }
        Ok(())
    }

    /// A tagged value (`!Tag value`).
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess as _;
        let child = self.child()?;
        let (_tag, value): (serde::de::IgnoredAny, _) = data.variant()?;
        value.newtype_variant_seed(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Billion laughs": ten levels of nine aliases each stand for 9^10 (3.5 billion) strings
    /// in 500 bytes. It must end quickly in a named error, not in memory exhaustion: here
    /// serde_yaml's jump count (100 alias jumps per event) stops it before the node count does.
    #[test]
    fn an_alias_bomb_fails_fast_with_a_named_error() {
        let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let start = std::time::Instant::now();
        let err = from_str::<serde_yaml::Value>(&text).unwrap_err().to_string();
        assert!(err.contains("repetition limit exceeded"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "took {:?}", start.elapsed());
    }

    /// One long anchored list, aliased many times: few alias jumps (within serde_yaml's
    /// limit), but 2 million nodes: the node count stops it.
    #[test]
    fn a_long_list_aliased_many_times_is_refused() {
        let list: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
        let text = format!("a: &a [{}]\nb: [{}]\n", list.join(", "), vec!["*a"; 1000].join(", "));
        let err = from_str::<serde_yaml::Value>(&text).unwrap_err().to_string();
        assert!(err.contains("once aliases are expanded"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_by_name() {
        let text = format!("{}1{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = from_str::<serde_yaml::Value>(&text).unwrap_err().to_string();
        assert!(err.contains(&format!("nested deeper than {MAX_DEPTH} levels")), "{err}");
        let ok = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        from_str::<serde_yaml::Value>(&ok).unwrap();
    }

    #[test]
    fn oversized_text_is_refused_by_name() {
        let text = format!("a: '{}'", "x".repeat(MAX_BYTES));
        let err = from_str::<serde_yaml::Value>(&text).unwrap_err().to_string();
        assert!(err.contains("over btm's limit"), "{err}");
    }

    /// Within the bounds, the same value (and the same errors) as serde_yaml's.
    #[test]
    fn ordinary_yaml_reads_as_serde_yaml_reads_it() {
        let text = "base: &b {lr: 1e-4, steps: 10}\nphases: [*b, *b, !Tag {x: 1}]\nname: run\n";
        assert_eq!(from_str::<serde_yaml::Value>(text).unwrap(), serde_yaml::from_str::<serde_yaml::Value>(text).unwrap());
        let bad = "a: [1, 2\nb: 3\n";
        assert_eq!(
            from_str::<serde_yaml::Value>(bad).unwrap_err().to_string(),
            serde_yaml::from_str::<serde_yaml::Value>(bad).unwrap_err().to_string()
        );
    }
}

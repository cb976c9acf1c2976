//! Key paths inside a YAML document (`p2p.auto.ha.master_nodes`, `k3s.args[2]`), used to name
//! the offending key in messages and to find its line in the source text.

use std::fmt;

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A path from the document root to a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct KeyPath(Vec<Seg>);

impl KeyPath {
    /// The path of the value under mapping key `key`.
    pub(super) fn key(&self, key: &str) -> KeyPath {
        self.with(Seg::Key(key.to_owned()))
    }

    /// The path of item `index` of this sequence.
    pub(super) fn index(&self, index: usize) -> KeyPath {
        self.with(Seg::Index(index))
    }

    /// The steps, root first.
    pub(super) fn segs(&self) -> &[Seg] {
        &self.0
    }

    fn with(&self, seg: Seg) -> KeyPath {
        let mut segs = Vec::with_capacity(self.0.len() + 1);
        segs.extend_from_slice(&self.0);
        segs.push(seg);
        KeyPath(segs)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_dotted_with_indices() {
        let p = KeyPath::default().key("k3s").key("args").index(2);
        assert_eq!(p.to_string(), "k3s.args[2]");
        assert_eq!(KeyPath::default().to_string(), "");
        assert_eq!(p.segs().len(), 3);
    }
}

//! The cluster layer: the replicated ledger gossiped between members, liveness, the master
//! election, role assignment and VPN address allocation. Sans-IO like the rest of the core.


/// A ledger write a component asks for; the cluster layer signs, stores and gossips it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

impl Write {
    /// `bucket/key = value`.
    pub fn put(bucket: &str, key: &str, value: impl Into<Vec<u8>>) -> Self {
        Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
            value: Some(value.into()),
        }
    }

    /// Deletes `bucket/key`.
    pub fn delete(bucket: &str, key: &str) -> Self {
        Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
            value: None,
        }
    }
}

/// FNV-32a of a string: Kairos picks its leader by the highest hash of the node uuid.
pub fn fnv32a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv32a(""), 0x811c_9dc5);
        assert_eq!(fnv32a("a"), 0xe40c_292c);
        assert_eq!(fnv32a("foobar"), 0xbf9c_f968);
    }
}

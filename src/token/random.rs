//! Uniform random alphanumeric strings for token generation.

/// The 62 characters generated strings are drawn from.
const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Bytes below this bound map uniformly onto the alphabet (248 = 4 * 62); the others are
/// rejected, so there is no modulo bias.
const ACCEPT_BELOW: u8 = 248;

/// A string of `len` characters drawn uniformly from [`ALPHABET`], by rejection sampling over
/// bytes from `fill` (which must produce uniformly random bytes).
pub(super) fn alphanumeric(len: usize, fill: &mut dyn FnMut(&mut [u8])) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        fill(&mut buf);
        for &b in &buf {
            if out.len() == len {
                break;
            }
            if b < ACCEPT_BELOW {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_biased_bytes_and_maps_the_rest() {
        // 248..=255 are skipped; 0, 61, 62, 247 map to A, 9, A, 9.
        let mut bytes = [248u8, 255, 0, 61, 62, 247].into_iter().cycle();
        let mut fill = |buf: &mut [u8]| buf.iter_mut().for_each(|b| *b = bytes.next().unwrap_or(0));
        assert_eq!(alphanumeric(4, &mut fill), "A9A9");
    }

    #[test]
    fn every_byte_value_is_accepted_or_rejected_uniformly() {
        let mut counts = [0u32; 62];
        for b in 0..ACCEPT_BELOW {
            counts[usize::from(b % 62)] += 1;
        }
        assert!(counts.iter().all(|&c| c == 4));
    }
}

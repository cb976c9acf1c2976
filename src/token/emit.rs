//! Hand-written YAML emitter for the token document.
//!
//! Output matches Go's gopkg.in/yaml.v2 `Marshal` of edgevpn's connection struct for every token
//! edgevpn can generate (alphanumeric strings): same field order, 2-space indentation, plain
//! scalars. Other strings are double-quoted with escapes so that serde_yaml (and yaml.v2) read
//! back exactly the same string.

use std::fmt::Write as _;

use super::{NetworkToken, OtpParams};

/// Words that YAML 1.1 (yaml.v2, what edgevpn reads with) or YAML 1.2 (serde_yaml) resolve to a
/// boolean or null when unquoted. Exactly yaml.v2's alphanumeric entries, a superset of
/// serde_yaml's.
const RESERVED_WORDS: [&str; 25] = [
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false",
    "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL",
];

/// The token as the YAML document edgevpn marshals (ends with a newline).
pub(super) fn token_yaml(token: &NetworkToken) -> String {
    let mut out = String::with_capacity(512);
    out.push_str("otp:\n");
    params(&mut out, "dht", &token.otp.dht);
    params(&mut out, "crypto", &token.otp.crypto);
    field(&mut out, "", "room", &token.room);
    field(&mut out, "", "rendezvous", &token.rendezvous);
    field(&mut out, "", "mdns", &token.mdns);
    // Writing to a String cannot fail.
    let _ = writeln!(out, "max_message_size: {}", token.max_message_size);
    out
}

fn params(out: &mut String, name: &str, p: &OtpParams) {
    let _ = writeln!(out, "  {name}:");
    let _ = writeln!(out, "    interval: {}", p.interval);
    field(out, "    ", "key", &p.key);
    let _ = writeln!(out, "    length: {}", p.length);
}

fn field(out: &mut String, indent: &str, name: &str, value: &str) {
    out.push_str(indent);
    out.push_str(name);
    out.push_str(": ");
    scalar(out, value);
    out.push('\n');
}

/// Appends `s` as a YAML scalar: plain when unambiguous, double-quoted otherwise.
pub(super) fn scalar(out: &mut String, s: &str) {
    if plain_is_safe(s) {
        out.push_str(s);
    } else {
        double_quoted(out, s);
    }
}

/// Plain style only for non-empty ASCII alphanumeric strings that no YAML resolver (1.1 or 1.2)
/// would read as a boolean, null or number.
fn plain_is_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
        && !RESERVED_WORDS.contains(&s)
        && !looks_numeric(s)
}

/// For an alphanumeric string: decimal, 0x/0o/0b integers (any case of the prefix), or a
/// decimal float with exponent (`12e3`). A superset of what yaml.v2 and serde_yaml resolve.
fn looks_numeric(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.first().is_some_and(u8::is_ascii_digit) {
        return false;
    }
    let all = |rest: &[u8], ok: fn(&u8) -> bool| !rest.is_empty() && rest.iter().all(ok);
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if let [b'0', prefix, rest @ ..] = b {
        let radix_ok = match prefix {
            b'x' | b'X' => all(rest, u8::is_ascii_hexdigit),
            b'o' | b'O' => all(rest, |c| (b'0'..=b'7').contains(c)),
            b'b' | b'B' => all(rest, |c| *c == b'0' || *c == b'1'),
            _ => false,
        };
        if radix_ok {
            return true;
        }
    }
    match b.iter().position(|c| *c == b'e' || *c == b'E') {
        Some(i) => all(&b[..i], u8::is_ascii_digit) && all(&b[i + 1..], u8::is_ascii_digit),
        None => false,
    }
}

/// YAML double-quoted scalar. Printable characters are written as is; quotes, backslashes,
/// control characters, line/paragraph separators, BOM and non-characters are escaped.
fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            '\u{85}' => out.push_str("\\N"),
            '\u{a0}' => out.push_str("\\_"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            ' '..='~' => out.push(c),
            c if is_printable_raw(c) => out.push(c),
            c => {
                let cp = u32::from(c);
                let _ = if cp <= 0xFF {
                    write!(out, "\\x{cp:02X}")
                } else if cp <= 0xFFFF {
                    write!(out, "\\u{cp:04X}")
                } else {
                    write!(out, "\\U{cp:08X}")
                };
            }
        }
    }
    out.push('"');
}

/// Non-ASCII characters YAML (and libyaml's reader) accept unescaped inside double quotes.
fn is_printable_raw(c: char) -> bool {
    matches!(u32::from(c), 0xA1..=0xD7FF | 0xE000..=0xFFFD | 0x1_0000..) && c != '\u{FEFF}'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emitted(s: &str) -> String {
        let mut out = String::new();
        scalar(&mut out, s);
        out
    }

    #[test]
    fn plain_or_quoted() {
        let rows: &[(&str, &str)] = &[
            ("abcXYZ019", "abcXYZ019"),
            ("4AbcDef", "4AbcDef"),
            ("0x1Fz", "0x1Fz"),
            ("e5", "e5"),
            ("12e", "12e"),
            ("yes", "\"yes\""),
            ("NULL", "\"NULL\""),
            ("Off", "\"Off\""),
            ("123", "\"123\""),
            ("0x1F", "\"0x1F\""),
            ("0O17", "\"0O17\""),
            ("0b101", "\"0b101\""),
            ("12e34", "\"12e34\""),
            ("", "\"\""),
            ("a b", "\"a b\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("x\ny\r\t", "\"x\\ny\\r\\t\""),
            ("\u{0}\u{1}\u{7f}\u{85}\u{a0}", "\"\\0\\x01\\x7F\\N\\_\""),
            (
                "\u{2028}\u{2029}\u{feff}\u{fffe}",
                "\"\\L\\P\\uFEFF\\uFFFE\"",
            ),
            ("é日本😀", "\"é日本😀\""),
        ];
        for (input, want) in rows {
            assert_eq!(&emitted(input), want, "input {input:?}");
        }
    }

    /// Every emitted scalar reads back as the same string with serde_yaml.
    #[test]
    fn scalars_round_trip_through_serde_yaml() {
        let mut samples: Vec<String> = [
            "",
            " ",
            "  lead",
            "trail ",
            "a: b",
            "#x",
            "x #y",
            "- a",
            "-",
            "?",
            ":",
            "~",
            "*a",
            "&a",
            "!tag",
            "%x",
            "@x",
            "`x",
            "|",
            ">",
            "'",
            "\"",
            "\\",
            "{a}",
            "[a]",
            "a,b",
            "true",
            "yes",
            "no",
            "on",
            "null",
            "Null",
            "123",
            "-1",
            "+1",
            "1.5",
            ".5",
            "1e5",
            "0x1F",
            "0o7",
            "0b1",
            ".inf",
            "-.inf",
            ".nan",
            "2001-12-14",
            "1:20",
            "<<",
            "---",
            "...",
            "\n",
            "a\nb",
            "a\r\nb",
            "\t",
            "\u{0}",
            "\u{1b}",
            "\u{7f}",
            "\u{80}",
            "\u{85}",
            "\u{a0}",
            "\u{2028}",
            "\u{2029}",
            "\u{feff}",
            "\u{fffe}",
            "\u{ffff}",
            "\u{10ffff}",
            "é",
            "日本",
            "😀",
            "inf",
            "NaN",
            "infinity",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Deterministic pseudo-random strings over a hostile alphabet.
        let pool: Vec<char> = "aZ09 :#-?'\"\\\n\r\t{}[],&*!|>%@`~.+e\u{0}\u{85}\u{2028}é😀"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 12) as usize;
            let s: String = (0..len)
                .map(|i| pool[((state >> (i * 5)) as usize) % pool.len()])
                .collect();
            samples.push(s);
        }
        for s in samples {
            let doc = format!("k: {}\n", emitted(&s));
            let v: serde_yaml::Value = serde_yaml::from_str(&doc).unwrap();
            assert_eq!(v["k"].as_str(), Some(s.as_str()), "doc {doc:?}");
        }
    }
}

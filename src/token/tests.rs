//! Table tests for token decoding, encoding, validation and generation.

use super::*;

/// Kairos `generate-token` style: i64::MAX intervals, 43-character strings, length 43. The YAML
/// is exactly what Go's yaml.v2 marshals for edgevpn's struct; the base64 was computed
/// independently (Python's base64 module).
const KAIROS_YAML: &str = "otp:\n  dht:\n    interval: 9223372036854775807\n    key: u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8dKLzdocJ\n    length: 43\n  crypto:\n    interval: 9223372036854775807\n    key: 2isAjIhKtJ0RlgLKOmxgJTeKdNnFRIBXuDL7DxtpYlS\n    length: 43\nroom: XpfKtHF4vUCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZD\nrendezvous: e1f8rESQedUStPKR0CsTy4Qwb8DwkNhFdnXsiVpzz63\nmdns: FfkCzJr4i0B3JrTAwR4y9ojfljoQoaF1LlqsajAIxNK\nmax_message_size: 20971520\n";
const KAIROS_B64: &str = "b3RwOgogIGRodDoKICAgIGludGVydmFsOiA5MjIzMzcyMDM2ODU0Nzc1ODA3CiAgICBrZXk6IHU4anpQZGUwSWd4TGQ2R25jZkJBZXBmSkJkMEtoOG9PT0w4ZEtMemRvY0oKICAgIGxlbmd0aDogNDMKICBjcnlwdG86CiAgICBpbnRlcnZhbDogOTIyMzM3MjAzNjg1NDc3NTgwNwogICAga2V5OiAyaXNBakloS3RKMFJsZ0xLT214Z0pUZUtkTm5GUklCWHVETDdEeHRwWWxTCiAgICBsZW5ndGg6IDQzCnJvb206IFhwZkt0SEY0dlVDc01laEdBa1d2ajdGQWM5UWVXSktZNDB1dlN3TUZMWkQKcmVuZGV6dm91czogZTFmOHJFU1FlZFVTdFBLUjBDc1R5NFF3YjhEd2tOaEZkblhzaVZweno2MwptZG5zOiBGZmtDekpyNGkwQjNKclRBd1I0eTlvamZsam9Rb2FGMUxscXNhakFJeE5LCm1heF9tZXNzYWdlX3NpemU6IDIwOTcxNTIwCg==";

/// edgevpn style: 32-character strings, length 32, intervals 360 and 9000.
const EDGEVPN_YAML: &str = "otp:\n  dht:\n    interval: 360\n    key: u8iS2G8NPRVdD53X83RZJzzzzgEOzdme\n    length: 32\n  crypto:\n    interval: 9000\n    key: nCkhvMdgaKjIg8xNbe3nNyjOq9wMxEhh\n    length: 32\nroom: 2FDEEtfjgVvVqE1SkHbn88HxjSI6bWHt\nrendezvous: P3fS2qHx6kwXoIIXGvOoNZYW2mZp0zVZ\nmdns: omHFwUbbYrEqmSM9wCZ7Uw9xfogoEmvn\nmax_message_size: 20971520\n";
const EDGEVPN_B64: &str = "b3RwOgogIGRodDoKICAgIGludGVydmFsOiAzNjAKICAgIGtleTogdThpUzJHOE5QUlZkRDUzWDgzUlpKenp6emdFT3pkbWUKICAgIGxlbmd0aDogMzIKICBjcnlwdG86CiAgICBpbnRlcnZhbDogOTAwMAogICAga2V5OiBuQ2todk1kZ2FLaklnOHhOYmUzbk55ak9xOXdNeEVoaAogICAgbGVuZ3RoOiAzMgpyb29tOiAyRkRFRXRmamdWdlZxRTFTa0hibjg4SHhqU0k2YldIdApyZW5kZXp2b3VzOiBQM2ZTMnFIeDZrd1hvSUlYR3ZPb05aWVcybVpwMHpWWgptZG5zOiBvbUhGd1ViYllyRXFtU005d0NaN1V3OXhmb2dvRW12bgptYXhfbWVzc2FnZV9zaXplOiAyMDk3MTUyMAo=";

fn params(interval: u64, key: &str, length: u32) -> OtpParams {
    OtpParams {
        interval,
        key: key.into(),
        length,
    }
}

fn kairos_token() -> NetworkToken {
    NetworkToken {
        otp: Otp {
            dht: params(
                NEVER_ROTATE,
                "u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8dKLzdocJ",
                43,
            ),
            crypto: params(
                NEVER_ROTATE,
                "2isAjIhKtJ0RlgLKOmxgJTeKdNnFRIBXuDL7DxtpYlS",
                43,
            ),
        },
        room: "XpfKtHF4vUCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZD".into(),
        rendezvous: "e1f8rESQedUStPKR0CsTy4Qwb8DwkNhFdnXsiVpzz63".into(),
        mdns: "FfkCzJr4i0B3JrTAwR4y9ojfljoQoaF1LlqsajAIxNK".into(),
        max_message_size: 20_971_520,
    }
}

fn edgevpn_token() -> NetworkToken {
    NetworkToken {
        otp: Otp {
            dht: params(360, "u8iS2G8NPRVdD53X83RZJzzzzgEOzdme", 32),
            crypto: params(9000, "nCkhvMdgaKjIg8xNbe3nNyjOq9wMxEhh", 32),
        },
        room: "2FDEEtfjgVvVqE1SkHbn88HxjSI6bWHt".into(),
        rendezvous: "P3fS2qHx6kwXoIIXGvOoNZYW2mZp0zVZ".into(),
        mdns: "omHFwUbbYrEqmSM9wCZ7Uw9xfogoEmvn".into(),
        max_message_size: 20_971_520,
    }
}

/// Every secret string of a token.
fn secrets(t: &NetworkToken) -> [&str; 5] {
    [
        &t.otp.dht.key,
        &t.otp.crypto.key,
        &t.room,
        &t.rendezvous,
        &t.mdns,
    ]
}

/// The EDGEVPN_YAML document as (field path, line) pairs, for building broken variants.
const LINES: [(&str, &str); 13] = [
    ("otp", "otp:"),
    ("otp.dht", "  dht:"),
    ("otp.dht.interval", "    interval: 360"),
    ("otp.dht.key", "    key: u8iS2G8NPRVdD53X83RZJzzzzgEOzdme"),
    ("otp.dht.length", "    length: 32"),
    ("otp.crypto", "  crypto:"),
    ("otp.crypto.interval", "    interval: 9000"),
    (
        "otp.crypto.key",
        "    key: nCkhvMdgaKjIg8xNbe3nNyjOq9wMxEhh",
    ),
    ("otp.crypto.length", "    length: 32"),
    ("room", "room: 2FDEEtfjgVvVqE1SkHbn88HxjSI6bWHt"),
    ("rendezvous", "rendezvous: P3fS2qHx6kwXoIIXGvOoNZYW2mZp0zVZ"),
    ("mdns", "mdns: omHFwUbbYrEqmSM9wCZ7Uw9xfogoEmvn"),
    ("max_message_size", "max_message_size: 20971520"),
];

/// EDGEVPN_YAML without `path` and its children.
fn yaml_without(path: &str) -> String {
    LINES
        .iter()
        .filter(|(p, _)| *p != path && !p.starts_with(&format!("{path}.")))
        .map(|(_, line)| format!("{line}\n"))
        .collect()
}

/// EDGEVPN_YAML with the value of leaf `path` replaced by the raw YAML `value`.
fn yaml_with(path: &str, value: &str) -> String {
    LINES
        .iter()
        .map(|(p, line)| match line.split_once(": ") {
            Some((name, _)) if *p == path => format!("{name}: {value}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

/// A predicate on the error a row expects.
type Check = fn(&TokenError) -> bool;

/// An edit applied to a valid token.
type Edit = fn(&mut NetworkToken);

fn b64(yaml: &str) -> String {
    BASE64.encode(yaml)
}

#[test]
fn edgevpn_layout_byte_for_byte() {
    let rows = [
        (KAIROS_YAML, KAIROS_B64, kairos_token()),
        (EDGEVPN_YAML, EDGEVPN_B64, edgevpn_token()),
    ];
    for (yaml, b64_text, token) in rows {
        assert_eq!(b64(yaml), b64_text, "fixture consistency");
        assert_eq!(emit::token_yaml(&token), yaml);
        assert_eq!(token.encode(), b64_text);
        let decoded = NetworkToken::decode(b64_text).unwrap();
        assert_eq!(decoded, token);
        assert_eq!(decoded.encode(), b64_text);
        assert_eq!(b64_text.parse::<NetworkToken>().unwrap(), token);
    }
    assert_eq!(edgevpn_yaml_from_lines(), EDGEVPN_YAML);
}

fn edgevpn_yaml_from_lines() -> String {
    yaml_without("none")
}

#[test]
fn never_rotate_intervals_decode_without_overflow() {
    let t = NetworkToken::decode(KAIROS_B64).unwrap();
    assert_eq!(t.otp.dht.interval, 9_223_372_036_854_775_807);
    assert_eq!(t.otp.crypto.interval, NEVER_ROTATE);
    let ks = t.key_schedule();
    for unix in [0, 8999, 9000, 1_700_000_000, i64::MAX as u64, u64::MAX] {
        assert_eq!(ks.crypto_window(unix), 0);
        assert_eq!(ks.dht_window(unix), 0);
    }
    assert_eq!(accepted_windows(0).collect::<Vec<_>>(), [0, 1]);
}

#[test]
fn whitespace_padding_and_line_breaks_are_tolerated() {
    let wrapped: String = EDGEVPN_B64
        .as_bytes()
        .chunks(76)
        .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
        .collect();
    let rows = [
        format!("  \n\t{EDGEVPN_B64}\r\n"),
        format!("{EDGEVPN_B64}\n"),
        EDGEVPN_B64.trim_end_matches('=').to_owned(),
        wrapped,
    ];
    for text in rows {
        assert_eq!(
            NetworkToken::decode(&text).unwrap(),
            edgevpn_token(),
            "{text:?}"
        );
    }
}

#[test]
fn missing_fields_are_named() {
    for (path, _) in LINES {
        let err = NetworkToken::decode(&b64(&yaml_without(path))).unwrap_err();
        assert_eq!(err, TokenError::Missing(path));
        assert_eq!(err.to_string(), format!("network token: {path} is missing"));
    }
    // Null counts as missing.
    let err = NetworkToken::decode(&b64(&yaml_with("otp.crypto.key", "~"))).unwrap_err();
    assert_eq!(err, TokenError::Missing("otp.crypto.key"));
}

#[test]
fn wrong_types_are_named() {
    let rows: [(&str, &str, &str, &str); 9] = [
        ("otp.dht.interval", "abc", "an integer", "a string"),
        ("otp.dht.interval", "\"9000\"", "an integer", "a string"),
        (
            "otp.crypto.interval",
            "1.5",
            "an integer",
            "a non-integer number",
        ),
        ("otp.crypto.length", "true", "an integer", "a boolean"),
        ("otp.dht.key", "12345", "a string", "a number"),
        ("room", "[a, b]", "a string", "a list"),
        ("rendezvous", "{a: b}", "a string", "a mapping"),
        ("mdns", "!custom x", "a string", "a tagged value"),
        ("max_message_size", "20MB", "an integer", "a string"),
    ];
    for (field, value, expected, found) in rows {
        let err = NetworkToken::decode(&b64(&yaml_with(field, value))).unwrap_err();
        assert_eq!(
            err,
            TokenError::WrongType {
                field,
                expected,
                found
            },
            "{field}: {value}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
    let not_a_block = "otp:\n  dht: 5\n  crypto: {}\n";
    assert_eq!(
        NetworkToken::decode(&b64(not_a_block)).unwrap_err(),
        TokenError::WrongType {
            field: "otp.dht",
            expected: "a mapping",
            found: "a number"
        }
    );
}

#[test]
fn out_of_range_values_are_rejected() {
    let max_i64 = i128::from(i64::MAX);
    let rows: [(&str, &str, i128, u64, u64); 11] = [
        ("otp.dht.interval", "0", 0, 1, NEVER_ROTATE),
        ("otp.dht.interval", "-1", -1, 1, NEVER_ROTATE),
        ("otp.crypto.interval", "-9000", -9000, 1, NEVER_ROTATE),
        (
            "otp.crypto.interval",
            "9223372036854775808",
            max_i64 + 1,
            1,
            NEVER_ROTATE,
        ),
        ("otp.dht.length", "0", 0, 1, 1024),
        ("otp.dht.length", "1025", 1025, 1, 1024),
        ("otp.crypto.length", "4294967296", 4_294_967_296, 1, 1024),
        ("otp.crypto.length", "-32", -32, 1, 1024),
        ("max_message_size", "0", 0, 1, 1 << 30),
        ("max_message_size", "1073741825", (1 << 30) + 1, 1, 1 << 30),
        ("max_message_size", "-1", -1, 1, 1 << 30),
    ];
    for (field, text, value, min, max) in rows {
        let err = NetworkToken::decode(&b64(&yaml_with(field, text))).unwrap_err();
        assert_eq!(
            err,
            TokenError::OutOfRange {
                field,
                value,
                min,
                max
            }
        );
        assert!(
            err.to_string()
                .starts_with(&format!("network token: {field} is {value}"))
        );
    }
    for field in [
        "otp.dht.key",
        "otp.crypto.key",
        "room",
        "rendezvous",
        "mdns",
    ] {
        let err = NetworkToken::decode(&b64(&yaml_with(field, "\"\""))).unwrap_err();
        assert_eq!(err, TokenError::EmptyField(field));
        assert_eq!(err.to_string(), format!("network token: {field} is empty"));
    }
}

#[test]
fn boundary_values_are_accepted() {
    let rows = [
        ("otp.dht.interval", "1"),
        ("otp.dht.interval", "9223372036854775807"),
        ("otp.dht.length", "1"),
        ("otp.crypto.length", "1024"),
        ("otp.crypto.length", "43"),
        ("max_message_size", "1"),
        ("max_message_size", "1073741824"),
        ("otp.dht.key", "\"quoted key\""),
        ("room", "'single quoted'"),
    ];
    for (field, value) in rows {
        let t = NetworkToken::decode(&b64(&yaml_with(field, value))).unwrap();
        assert_eq!(NetworkToken::decode(&t.encode()).unwrap(), t, "{field}");
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let yaml = EDGEVPN_YAML
        .replace("  dht:\n", "  dht:\n    future: [1, 2]\n")
        .replace("room:", "extra_top: {a: 1}\n7: seven\nroom:");
    assert_eq!(NetworkToken::decode(&b64(&yaml)).unwrap(), edgevpn_token());
}

#[test]
fn malformed_input_is_rejected() {
    let rows: Vec<(String, Check)> = vec![
        (String::new(), |e| *e == TokenError::Blank),
        (" \r\n\t ".into(), |e| *e == TokenError::Blank),
        ("not a token!".into(), |e| {
            matches!(e, TokenError::NotBase64(_))
        }),
        ("abc$def=".into(), |e| matches!(e, TokenError::NotBase64(_))),
        ("a".into(), |e| matches!(e, TokenError::NotBase64(_))),
        ("====".into(), |e| matches!(e, TokenError::NotBase64(_))),
        (b64("a: b: c"), |e| matches!(e, TokenError::NotYaml(_))),
        (b64("{unclosed"), |e| matches!(e, TokenError::NotYaml(_))),
        (BASE64.encode([0xff, 0xfe, 0x00, 0x80]), |e| {
            matches!(e, TokenError::NotYaml(_))
        }),
        (b64("room: a\nroom: b\n"), |e| {
            matches!(e, TokenError::NotYaml(_))
        }),
        (b64("a: 1\n---\nb: 2\n"), |e| {
            matches!(e, TokenError::NotYaml(_))
        }),
        (b64("just some text"), |e| {
            *e == TokenError::NotMapping("a string")
        }),
        (b64("- 1\n- 2\n"), |e| {
            *e == TokenError::NotMapping("a list")
        }),
        (b64("# only a comment\n"), |e| {
            *e == TokenError::NotMapping("null")
        }),
        ("A".repeat(MAX_TOKEN_LEN + 1), |e| {
            *e == TokenError::TooLong {
                len: MAX_TOKEN_LEN + 1,
                max: MAX_TOKEN_LEN,
            }
        }),
        (format!("{}{EDGEVPN_B64}", " ".repeat(MAX_TOKEN_LEN)), |e| {
            matches!(e, TokenError::TooLong { .. })
        }),
    ];
    for (text, check) in rows {
        let err = NetworkToken::decode(&text).unwrap_err();
        assert!(
            check(&err),
            "{:?} gave {err:?}",
            &text[..text.len().min(40)]
        );
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn validate_checks_programmatic_tokens() {
    let rows: [(Edit, TokenError); 4] = [
        (
            |t| t.otp.dht.interval = u64::MAX,
            TokenError::OutOfRange {
                field: "otp.dht.interval",
                value: i128::from(u64::MAX),
                min: 1,
                max: NEVER_ROTATE,
            },
        ),
        (
            |t| t.otp.crypto.length = 0,
            TokenError::OutOfRange {
                field: "otp.crypto.length",
                value: 0,
                min: 1,
                max: 1024,
            },
        ),
        (|t| t.mdns.clear(), TokenError::EmptyField("mdns")),
        (
            |t| t.max_message_size = u64::MAX,
            TokenError::OutOfRange {
                field: "max_message_size",
                value: i128::from(u64::MAX),
                min: 1,
                max: 1 << 30,
            },
        ),
    ];
    for (edit, want) in rows {
        let mut t = edgevpn_token();
        edit(&mut t);
        assert_eq!(t.validate(), Err(want.clone()));
        // Encoding still works; decoding reports the same problem.
        assert_eq!(NetworkToken::decode(&t.encode()), Err(want));
    }
    assert_eq!(kairos_token().validate(), Ok(()));
}

#[test]
fn any_strings_round_trip() {
    let rows = [
        "true",
        "123",
        "0x1F",
        "yes",
        "null",
        "~",
        "a b",
        " lead",
        "trail ",
        "a: b",
        "#c",
        "- x",
        "\"q\"",
        "'s'",
        "back\\slash",
        "multi\nline",
        "cr\r\n",
        "tab\t",
        "\u{0}",
        "\u{85}\u{2028}",
        "\u{feff}",
        "日本語",
        "😀",
        "{x}",
        "[y]",
        "*z",
        "&w",
        "!t",
        "%p",
        "@a",
        "`b",
        "|",
        ">",
        "---",
        "...",
        "<<",
    ];
    for s in rows {
        let mut t = edgevpn_token();
        t.otp.dht.key = s.into();
        t.otp.crypto.key = format!("{s}{s}");
        t.room = s.into();
        t.rendezvous = format!("x{s}");
        t.mdns = format!("{s}x");
        assert_eq!(NetworkToken::decode(&t.encode()).unwrap(), t, "{s:?}");
    }
    // Strings a plain scalar would turn into another type are double-quoted, as yaml.v2 does.
    let mut t = edgevpn_token();
    t.room = "123".into();
    t.mdns = "true".into();
    let yaml = emit::token_yaml(&t);
    assert!(yaml.contains("\nroom: \"123\"\n") && yaml.contains("\nmdns: \"true\"\n"));
}

#[test]
fn generate_round_trips() {
    for interval in [NEVER_ROTATE, 9000, 360] {
        let t = NetworkToken::generate(interval).unwrap();
        assert_eq!(t.otp.dht.interval, interval);
        assert_eq!(t.otp.crypto.interval, interval);
        assert_eq!((t.otp.dht.length, t.otp.crypto.length), (43, 43));
        assert_eq!(t.max_message_size, DEFAULT_MAX_MESSAGE_SIZE);
        for s in secrets(&t) {
            assert_eq!(s.len(), GENERATED_LEN);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        }
        let text = t.encode();
        assert_eq!(NetworkToken::decode(&text).unwrap(), t);
        assert_eq!(NetworkToken::decode(&text).unwrap().encode(), text);
    }
    let a = NetworkToken::generate(NEVER_ROTATE).unwrap();
    let b = NetworkToken::generate(NEVER_ROTATE).unwrap();
    assert_ne!(a, b);
    let unique: std::collections::HashSet<&str> = secrets(&a).into_iter().collect();
    assert_eq!(unique.len(), 5, "all five strings differ");
}

#[test]
fn generate_with_is_deterministic_and_clamps_interval() {
    let counter = |start: u8| {
        let mut n = start;
        move |buf: &mut [u8]| {
            for b in buf {
                *b = n;
                n = n.wrapping_add(1);
            }
        }
    };
    let t1 = NetworkToken::generate_with(9000, &mut counter(0));
    let t2 = NetworkToken::generate_with(9000, &mut counter(0));
    assert_eq!(t1, t2);
    // Bytes 0..43 map to A..Z, a..q (the rest of each 64-byte draw is discarded).
    assert_eq!(
        t1.otp.dht.key,
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"
    );
    assert_eq!(t1.validate(), Ok(()));
    let rows = [(0, 1), (1, 1), (u64::MAX, NEVER_ROTATE)];
    for (given, want) in rows {
        let t = NetworkToken::generate_with(given, &mut counter(7));
        assert_eq!(t.otp.dht.interval, want);
        assert_eq!(t.validate(), Ok(()));
    }
}

#[test]
fn debug_never_shows_secrets() {
    for t in [kairos_token(), edgevpn_token()] {
        let text = format!("{t:?} {:?} {:?}", t.otp, t.otp.crypto);
        let pretty = format!("{t:#?}");
        for s in secrets(&t) {
            assert!(!text.contains(s) && !pretty.contains(s), "{text}");
        }
        assert!(text.contains("<redacted>") && text.contains("20971520"));
    }
    // Errors about a secret field never echo its value.
    let err =
        NetworkToken::decode(&b64(&yaml_with("otp.dht.key", "[u8iS2G8NPRVdD53X]"))).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("u8iS2G8NPRVdD53X"));
}

/// A token body that is an alias bomb or deeply nested is refused before it is loaded.
#[test]
fn yaml_bombs_in_the_body_are_refused_before_loading() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
    for i in 1..8 {
        bomb += &format!("a{i}: &a [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n");
    }
    let nested = format!("{}x{}", "[".repeat(20_000), "]".repeat(20_000));
    for body in [bomb, nested] {
        let e = NetworkToken::decode(&b64(&body)).unwrap_err();
        assert!(matches!(e, TokenError::OverBudget(_)), "{e}");
    }
}

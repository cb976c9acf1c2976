//! The DNS message format (RFC 1035) as far as the VPN's DNS service needs it: a query's header
//! and first question, answers built from record text, and the few fields of an upstream
//! answer the forwarder checks. Every parser is bounded and returns a typed error.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Largest DNS message read or built over UDP (EDNS0's common buffer size).
pub const MAX_MESSAGE: usize = 4096;
/// Largest answer sent to a client that did not announce a bigger buffer (RFC 1035).
pub const MAX_PLAIN_UDP: usize = 512;
/// Largest encoded domain name (RFC 1035).
pub const MAX_NAME: usize = 255;
/// Most compression pointers followed in one name.
const MAX_POINTERS: usize = 16;
/// Most resource records walked in an upstream answer.
const MAX_RECORDS: usize = 256;
/// Header length.
const HEADER: usize = 12;

/// Record types answered from the ledger.
pub const TYPE_A: u16 = 1;
/// `NS`.
pub const TYPE_NS: u16 = 2;
/// `CNAME`.
pub const TYPE_CNAME: u16 = 5;
/// `PTR`.
pub const TYPE_PTR: u16 = 12;
/// `MX`.
pub const TYPE_MX: u16 = 15;
/// `TXT`.
pub const TYPE_TXT: u16 = 16;
/// `AAAA`.
pub const TYPE_AAAA: u16 = 28;
/// Class `IN`.
pub const CLASS_IN: u16 = 1;

/// Response codes used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// `NOERROR`.
    NoError = 0,
    /// `FORMERR`.
    FormErr = 1,
    /// `SERVFAIL`.
    ServFail = 2,
    /// `NXDOMAIN`.
    NxDomain = 3,
    /// `NOTIMP`.
    NotImp = 4,
    /// `REFUSED`.
    Refused = 5,
}

/// Record type names edgevpn's API uses (miekg/dns `TypeToString`), for the types answered.
pub const TYPE_NAMES: [(&str, u16); 7] = [
    ("A", TYPE_A),
    ("NS", TYPE_NS),
    ("CNAME", TYPE_CNAME),
    ("PTR", TYPE_PTR),
    ("MX", TYPE_MX),
    ("TXT", TYPE_TXT),
    ("AAAA", TYPE_AAAA),
];

/// The number of a record type name (`A`, `AAAA`, ...), case-insensitive.
#[must_use]
pub fn type_number(name: &str) -> Option<u16> {
    TYPE_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, t)| *t)
}

/// The name of a record type number.
#[must_use]
pub fn type_name(number: u16) -> Option<&'static str> {
    TYPE_NAMES
        .iter()
        .find(|(_, t)| *t == number)
        .map(|(n, _)| *n)
}

/// Why a message was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its header or its fields say.
    Truncated,
    /// Longer than [`MAX_MESSAGE`].
    TooLong,
    /// A response where a query was expected, or the reverse.
    WrongDirection,
    /// No question.
    NoQuestion,
    /// A name longer than [`MAX_NAME`], with a bad label or too many pointers.
    BadName,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "message truncated",
            WireError::TooLong => "message too long",
            WireError::WrongDirection => "query/response flag unexpected",
            WireError::NoQuestion => "no question",
            WireError::BadName => "malformed name",
        })
    }
}

impl std::error::Error for WireError {}

/// A query: its id, flags and first question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The client's id.
    pub id: u16,
    /// Operation code (0: standard query).
    pub opcode: u8,
    /// Recursion desired.
    pub recursion_desired: bool,
    /// The name asked, as text with a trailing dot (`web.vpn.`), case as sent.
    pub name: Vec<u8>,
    /// The type asked.
    pub qtype: u16,
    /// The class asked.
    pub qclass: u16,
    /// The question's bytes as sent (name, type, class), copied into answers.
    pub question: Vec<u8>,
    /// The UDP payload size the client accepts (EDNS0), else 512.
    pub udp_size: usize,
}

impl Query {
    /// The cache key: the lower-cased name, type and class.
    #[must_use]
    pub fn key(&self) -> (Vec<u8>, u16, u16) {
        (self.name.to_ascii_lowercase(), self.qtype, self.qclass)
    }
}

/// Reads a query.
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    if msg.len() > MAX_MESSAGE {
        return Err(WireError::TooLong);
    }
    let header = msg.get(..HEADER).ok_or(WireError::Truncated)?;
    if header[2] & 0x80 != 0 {
        return Err(WireError::WrongDirection);
    }
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    if qdcount == 0 {
        return Err(WireError::NoQuestion);
    }
    let (name, after_name) = read_name(msg, HEADER)?;
    let fixed = msg
        .get(after_name..after_name + 4)
        .ok_or(WireError::Truncated)?;
    let end = after_name + 4;
    let arcount = u16::from_be_bytes([header[10], header[11]]);
    let udp_size = if qdcount == 1 && arcount > 0 {
        edns_size(msg, end).unwrap_or(MAX_PLAIN_UDP)
    } else {
        MAX_PLAIN_UDP
    };
    Ok(Query {
        id: u16::from_be_bytes([header[0], header[1]]),
        opcode: (header[2] >> 3) & 0x0f,
        recursion_desired: header[2] & 0x01 != 0,
        name,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        question: msg[HEADER..end].to_vec(),
        udp_size,
    })
}

/// The payload size of an OPT record (RFC 6891) right after the question, clamped to
/// 512..=[`MAX_MESSAGE`].
fn edns_size(msg: &[u8], at: usize) -> Option<usize> {
    // An OPT record has the root name (one zero byte).
    let rr = msg.get(at..at + 11)?;
    (rr[0] == 0 && u16::from_be_bytes([rr[1], rr[2]]) == 41)
        .then(|| usize::from(u16::from_be_bytes([rr[3], rr[4]])).clamp(MAX_PLAIN_UDP, MAX_MESSAGE))
}

/// Reads the name at `at` (following compression pointers, bounded); returns it as dotted
/// text with a trailing dot and the offset after it in `msg`.
fn read_name(msg: &[u8], at: usize) -> Result<(Vec<u8>, usize), WireError> {
    let mut name = Vec::new();
    let mut pos = at;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *msg.get(pos).ok_or(WireError::Truncated)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                if name.is_empty() {
                    name.push(b'.');
                }
                return Ok((name, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = msg
                    .get(pos + 1..pos + 1 + usize::from(len))
                    .ok_or(WireError::Truncated)?;
                if label.contains(&b'.') || name.len() + label.len() + 1 > MAX_NAME {
                    return Err(WireError::BadName);
                }
                name.extend_from_slice(label);
                name.push(b'.');
                pos += 1 + usize::from(len);
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(WireError::Truncated)?;
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return Err(WireError::BadName);
                }
                end.get_or_insert(pos + 2);
                pos = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            }
            _ => return Err(WireError::BadName),
        }
    }
}

/// Skips the name at `at`; the offset after it.
fn skip_name(msg: &[u8], at: usize) -> Result<usize, WireError> {
    read_name(msg, at).map(|(_, end)| end)
}

/// Encodes dotted `text` (trailing dot optional) as a name.
fn encode_name(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let text = text.trim().trim_end_matches('.');
    let start = out.len();
    if !text.is_empty() {
        for label in text.split('.') {
            let len = u8::try_from(label.len())
                .ok()
                .filter(|l| (1..=63).contains(l))?;
            out.push(len);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    (out.len() - start <= MAX_NAME).then_some(())
}

/// The RDATA of a record of type `rtype` written as edgevpn's record text (the right-hand side
/// of a zone-file line: `10.1.0.5`, `10 mail.vpn.`, `some text`); `None` when it does not parse
/// or the type is not answered.
#[must_use]
pub fn rdata(rtype: u16, text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    let mut out = Vec::new();
    match rtype {
        TYPE_A => out.extend_from_slice(&text.parse::<Ipv4Addr>().ok()?.octets()),
        TYPE_AAAA => out.extend_from_slice(&text.parse::<Ipv6Addr>().ok()?.octets()),
        TYPE_NS | TYPE_CNAME | TYPE_PTR => encode_name(text, &mut out)?,
        TYPE_MX => {
            let (preference, host) = text.split_once(char::is_whitespace)?;
            out.extend_from_slice(&preference.parse::<u16>().ok()?.to_be_bytes());
            encode_name(host, &mut out)?;
        }
        TYPE_TXT => {
            let text = text
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .unwrap_or(text);
            if text.is_empty() {
                out.push(0);
            }
            for chunk in text.as_bytes().chunks(255) {
                out.push(u8::try_from(chunk.len()).ok()?);
                out.extend_from_slice(chunk);
            }
        }
        _ => return None,
    }
    (out.len() <= MAX_PLAIN_UDP).then_some(out)
}

/// One answer record for the question's name: type, TTL, RDATA.
pub type AnswerRecord = (u16, u32, Vec<u8>);

/// Builds the answer to `query`: `rcode`, authoritative or not, and `answers` (type, TTL,
/// RDATA) for the question's name. An answer that does not fit the client's UDP size is sent
/// without records and with TC set.
#[must_use]
pub fn response(
    query: &Query,
    rcode: Rcode,
    authoritative: bool,
    answers: &[AnswerRecord],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + query.question.len() + 64);
    let head = |out: &mut Vec<u8>, ancount: u16, truncated: bool| {
        out.extend_from_slice(&query.id.to_be_bytes());
        let mut flags1 = 0x80 | (query.opcode << 3);
        if authoritative {
            flags1 |= 0x04;
        }
        if truncated {
            flags1 |= 0x02;
        }
        if query.recursion_desired {
            flags1 |= 0x01;
        }
        out.push(flags1);
        out.push(0x80 | rcode as u8); // RA: names outside the ledger are forwarded.
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ancount.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&query.question);
    };
    let ancount = u16::try_from(answers.len()).unwrap_or(u16::MAX);
    head(&mut out, ancount, false);
    for (rtype, ttl, data) in answers {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&query.qclass.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(data);
    }
    if out.len() > query.udp_size {
        out.clear();
        head(&mut out, 0, true);
    }
    out
}

/// What the forwarder reads of an upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    /// Its id.
    pub id: u16,
    /// Its response code.
    pub rcode: u8,
    /// TC is set.
    pub truncated: bool,
    /// Number of answer records.
    pub answers: u16,
    /// Its question's bytes.
    pub question: Vec<u8>,
    /// The smallest TTL of its records (`None` without records).
    pub min_ttl: Option<u32>,
}

/// Reads an upstream answer's header, question and record TTLs.
pub fn parse_upstream(msg: &[u8]) -> Result<UpstreamAnswer, WireError> {
    if msg.len() > MAX_MESSAGE {
        return Err(WireError::TooLong);
    }
    let header = msg.get(..HEADER).ok_or(WireError::Truncated)?;
    if header[2] & 0x80 == 0 {
        return Err(WireError::WrongDirection);
    }
    if u16::from_be_bytes([header[4], header[5]]) != 1 {
        return Err(WireError::NoQuestion);
    }
    let question_end = skip_name(msg, HEADER)? + 4;
    let question = msg.get(HEADER..question_end).ok_or(WireError::Truncated)?;
    let count = |i: usize| usize::from(u16::from_be_bytes([header[i], header[i + 1]]));
    let records = (count(6) + count(8) + count(10)).min(MAX_RECORDS);
    let mut pos = question_end;
    let mut min_ttl: Option<u32> = None;
    for _ in 0..records {
        pos = skip_name(msg, pos)?;
        let fixed = msg.get(pos..pos + 10).ok_or(WireError::Truncated)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        pos += 10 + len;
        if pos > msg.len() {
            return Err(WireError::Truncated);
        }
        if rtype != 41 {
            min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
        }
    }
    Ok(UpstreamAnswer {
        id: u16::from_be_bytes([header[0], header[1]]),
        rcode: header[3] & 0x0f,
        truncated: header[2] & 0x02 != 0,
        answers: u16::from_be_bytes([header[6], header[7]]),
        question: question.to_vec(),
        min_ttl,
    })
}

/// `msg` with its id replaced.
#[must_use]
pub fn with_id(msg: &[u8], id: u16) -> Vec<u8> {
    let mut out = msg.to_vec();
    if out.len() >= 2 {
        out[..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// A query for `name` (dotted) and `qtype`, id `id`, recursion desired (tests and tools).
#[must_use]
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    if encode_name(name, &mut out).is_none() {
        out.push(0);
    }
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_reads_back() {
        let q = parse_query(&build_query(0x1234, "Web.VPN", TYPE_A)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, b"Web.VPN.");
        assert_eq!(q.key().0, b"web.vpn.");
        assert_eq!((q.qtype, q.qclass), (TYPE_A, CLASS_IN));
        assert!(q.recursion_desired);
        assert_eq!(q.udp_size, MAX_PLAIN_UDP);
    }

    #[test]
    fn answers_carry_the_records() {
        let q = parse_query(&build_query(7, "web.vpn.", TYPE_A)).unwrap();
        let data = rdata(TYPE_A, "10.1.0.5").unwrap();
        let r = response(&q, Rcode::NoError, true, &[(TYPE_A, 3600, data)]);
        let up = parse_upstream(&r).unwrap();
        assert_eq!((up.id, up.rcode, up.answers), (7, 0, 1));
        assert_eq!(up.min_ttl, Some(3600));
        assert_eq!(up.question, q.question);
        assert_eq!(&r[r.len() - 4..], &[10, 1, 0, 5]);
    }

    #[test]
    fn record_text_by_type() {
        assert_eq!(rdata(TYPE_AAAA, "fd00::1").unwrap().len(), 16);
        assert_eq!(rdata(TYPE_CNAME, "a.b.").unwrap(), b"\x01a\x01b\x00");
        assert_eq!(
            rdata(TYPE_MX, "10 mx.vpn").unwrap(),
            b"\x00\x0a\x02mx\x03vpn\x00"
        );
        assert_eq!(rdata(TYPE_TXT, "\"hi there\"").unwrap(), b"\x08hi there");
        assert_eq!(rdata(TYPE_A, "not an ip"), None);
        assert_eq!(rdata(99, "x"), None);
        assert_eq!(rdata(TYPE_CNAME, &"a".repeat(64)), None);
    }

    #[test]
    fn oversize_answers_are_truncated() {
        let q = parse_query(&build_query(1, "t.vpn", TYPE_TXT)).unwrap();
        let big = rdata(TYPE_TXT, &"x".repeat(400)).unwrap();
        let r = response(
            &q,
            Rcode::NoError,
            true,
            &[(TYPE_TXT, 60, big.clone()), (TYPE_TXT, 60, big)],
        );
        let up = parse_upstream(&r).unwrap();
        assert!(up.truncated);
        assert_eq!(up.answers, 0);
    }

    #[test]
    fn malformed_input_is_refused_with_a_reason() {
        assert_eq!(parse_query(&[0; 5]), Err(WireError::Truncated));
        assert_eq!(
            parse_query(&vec![0; MAX_MESSAGE + 1]),
            Err(WireError::TooLong)
        );
        let mut q = build_query(1, "a.b", TYPE_A);
        q[5] = 0;
        assert_eq!(parse_query(&q), Err(WireError::NoQuestion));
        let mut r = build_query(1, "a.b", TYPE_A);
        r[2] |= 0x80;
        assert_eq!(parse_query(&r), Err(WireError::WrongDirection));
        // A pointer loop.
        let mut looped = build_query(1, "a", TYPE_A);
        looped.truncate(HEADER);
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looped), Err(WireError::BadName));
        // Every prefix of a valid query fails cleanly, none panics.
        let good = build_query(9, "www.example.vpn", TYPE_AAAA);
        for n in 0..good.len() {
            assert!(parse_query(&good[..n]).is_err());
            let _ = parse_upstream(&good[..n]);
        }
    }
}

use super::*;

const MSS: usize = 1160;

/// A TCP/IPv4 packet with timestamps (a 32-byte TCP header) and `payload`; checksums valid.
fn tcp4(src: [u8; 4], sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 32];
    p[0] = 0x45;
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = IPPROTO_TCP;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[10, 1, 0, 2]);
    let t = 20;
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
    p[t + 12] = 8 << 4;
    p[t + 13] = flags;
    p[t + 14..t + 16].copy_from_slice(&501u16.to_be_bytes());
    // NOP NOP TS(10): kind 8, len 10.
    p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    ipv4_checksum(&mut p[..20]);
    let pseudo = pseudo_sum4(&p, (p.len() - 20) as u64);
    let sum = !fold(sum_be(&p[20..], pseudo));
    p[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
    p
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn with_vnet(header: VnetHeader, packet: &[u8]) -> Vec<u8> {
    let mut read = header.encode().to_vec();
    read.extend_from_slice(packet);
    read
}

fn split_all(read: &[u8]) -> Result<Vec<Bytes>, OffloadError> {
    let mut pool = ChunkPool::new(SEGMENT_POOL_CHUNK, 2);
    let mut out = Vec::new();
    split(read, &mut pool, |p| out.push(p))?;
    Ok(out)
}

fn assert_checksums_valid(p: &[u8]) {
    let ip_len = usize::from(p[0] & 0x0f) * 4;
    assert_eq!(
        fold(sum_be(&p[..ip_len], 0)),
        0xffff,
        "IPv4 header checksum"
    );
    let pseudo = pseudo_sum4(p, (p.len() - ip_len) as u64);
    assert_eq!(fold(sum_be(&p[ip_len..], pseudo)), 0xffff, "TCP checksum");
}

fn tso() -> VnetHeader {
    VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 52,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    }
}

#[test]
fn checksum_matches_a_known_header() {
    // RFC 1071-style example: a real IPv4 header whose checksum is 0xb861.
    let mut h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(fold(sum_be(&h, 0)), 0xffff);
    ipv4_checksum(&mut h);
    assert_eq!(&h[10..12], &[0xb8, 0x61]);
    // Odd lengths pad with a zero byte.
    assert_eq!(sum_be(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
}

#[test]
fn the_fast_sum_matches_the_textbook_one() {
    let naive = |data: &[u8]| {
        let mut acc = 0u64;
        for pair in data.chunks(2) {
            acc += u64::from(pair[0]) << 8 | u64::from(*pair.get(1).unwrap_or(&0));
        }
        fold(acc)
    };
    let data: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for len in (0..200).chain([1199, 1200, 1201, 2999, 3000]) {
        for start in [0, 1, 3] {
            let part = &data[start..start + len.min(data.len() - start)];
            assert_eq!(fold(sum_be(part, 0)), naive(part), "len {len} from {start}");
        }
    }
    assert_eq!(fold(sum_be(&[0xff; 4096], 0)), 0xffff);
}

#[test]
fn vnet_header_round_trips() {
    let h = VnetHeader {
        flags: 1,
        gso_type: 1,
        hdr_len: 52,
        gso_size: 1160,
        csum_start: 20,
        csum_offset: 16,
    };
    let bytes = h.encode();
    assert_eq!(VnetHeader::parse(&bytes), Ok((h, &[][..])));
    assert_eq!(VnetHeader::parse(&bytes[..9]), Err(OffloadError::Truncated));
}

#[test]
fn a_super_packet_splits_into_valid_segments() {
    let data = payload(3 * MSS + 500);
    let flags = TCP_ACK | TCP_PSH | TCP_CWR;
    let sp = tcp4([10, 1, 0, 1], 40000, 1_000_000, flags, &data);
    let segments = split_all(&with_vnet(tso(), &sp)).unwrap();
    assert_eq!(segments.len(), 4);
    let mut joined = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        assert_checksums_valid(s);
        let want_len = 52 + if i < 3 { MSS } else { 500 };
        assert_eq!(s.len(), want_len, "segment {i}");
        assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
        assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16, "IP id");
        let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
        assert_eq!(seq, 1_000_000 + (i * MSS) as u32);
        let f = s[33];
        assert_eq!(f & TCP_PSH != 0, i == 3, "PSH only on the last");
        assert_eq!(f & TCP_CWR != 0, i == 0, "CWR only on the first");
        assert_eq!(&s[..2], &sp[..2]);
        assert_eq!(&s[34..36], &sp[34..36], "window");
        assert_eq!(&s[38..52], &sp[38..52], "urgent pointer, options");
        joined.extend_from_slice(&s[52..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn sequence_numbers_wrap() {
    let sp = tcp4([10, 1, 0, 1], 1, u32::MAX - 10, TCP_ACK, &payload(2 * MSS));
    let segments = split_all(&with_vnet(tso(), &sp)).unwrap();
    let seq = |s: &Bytes| u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
    assert_eq!(seq(&segments[1]), (MSS as u32) - 11);
    segments.iter().for_each(|s| assert_checksums_valid(s));
}

#[test]
fn a_partial_checksum_is_completed() {
    let p = tcp4([10, 1, 0, 1], 1, 5, TCP_ACK, &payload(333));
    let mut partial = p.clone();
    let pseudo = fold(pseudo_sum4(&p, (p.len() - 20) as u64));
    partial[36..38].copy_from_slice(&pseudo.to_be_bytes());
    let header = VnetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 16,
        ..VnetHeader::default()
    };
    let out = split_all(&with_vnet(header, &partial)).unwrap();
    assert_eq!(out, [Bytes::from(p.clone())]);
    // Without the flag the packet passes untouched.
    let out = split_all(&with_vnet(VnetHeader::default(), &p)).unwrap();
    assert_eq!(out, [Bytes::from(p)]);
}

#[test]
fn malformed_reads_are_errors() {
    let p = tcp4([10, 1, 0, 1], 1, 5, TCP_ACK, &payload(100));
    let bad_offset = VnetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 1000,
        ..VnetHeader::default()
    };
    let udp_gso = VnetHeader {
        gso_type: 5,
        ..VnetHeader::default()
    };
    let zero_mss = VnetHeader {
        gso_size: 0,
        ..tso()
    };
    let table: [(&str, Vec<u8>, OffloadError); 5] = [
        ("short", vec![0; 5], OffloadError::Truncated),
        (
            "offset",
            with_vnet(bad_offset, &p),
            OffloadError::BadChecksumOffset,
        ),
        (
            "udp gso",
            with_vnet(udp_gso, &p),
            OffloadError::UnsupportedGso(5),
        ),
        ("zero mss", with_vnet(zero_mss, &p), OffloadError::NotTcp4),
        ("not tcp", with_vnet(tso(), &p[..30]), OffloadError::NotTcp4),
    ];
    for (name, read, want) in table {
        assert_eq!(split_all(&read), Err(want), "{name}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = tcp4([10, 1, 0, 1], 1, 5, TCP_ACK, &payload(3000));
    let mut coalescer = Coalescer::new();
    for _ in 0..3000 {
        let mut read = with_vnet(tso(), &base);
        for _ in 0..(next() % 6) {
            let at = (next() as usize) % read.len();
            read[at] = next() as u8;
        }
        read.truncate(1 + (next() as usize) % read.len());
        let _ = split_all(&read);
        coalescer.push(Bytes::from(read[VNET_HDR_LEN.min(read.len())..].to_vec()));
        if coalescer.is_full() {
            coalescer.flush(|_, _| Ok::<(), ()>(())).unwrap();
        }
    }
}

/// What the kernel does with a merged write: completes the TCP checksum.
fn kernel_completes(header: &[u8; VNET_HDR_LEN], packet: &[u8]) -> Vec<u8> {
    let (h, _) = VnetHeader::parse(header).unwrap();
    let mut p = packet.to_vec();
    if h.flags & F_NEEDS_CSUM != 0 {
        let (start, at) = (
            usize::from(h.csum_start),
            usize::from(h.csum_start + h.csum_offset),
        );
        let sum = !fold(sum_be(&p[start..], 0));
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

fn flush_all(c: &mut Coalescer) -> Vec<(VnetHeader, Vec<u8>)> {
    let mut out = Vec::new();
    c.flush(|h, parts| {
        let p: Vec<u8> = parts.iter().flat_map(|s| s.iter().copied()).collect();
        out.push((VnetHeader::parse(h).unwrap().0, kernel_completes(h, &p)));
        Ok::<(), ()>(())
    })
    .unwrap();
    out
}

#[test]
fn split_segments_coalesce_back_into_the_super_packet() {
    let data = payload(5 * MSS + 77);
    let sp = tcp4([10, 1, 0, 1], 40000, 9, TCP_ACK | TCP_PSH, &data);
    let mut c = Coalescer::new();
    for s in split_all(&with_vnet(tso(), &sp)).unwrap() {
        c.push(s);
    }
    let out = flush_all(&mut c);
    assert_eq!(out.len(), 1);
    let (h, merged) = &out[0];
    assert_eq!(h.gso_type, GSO_TCPV4);
    assert_eq!(usize::from(h.gso_size), MSS);
    assert_eq!(h.hdr_len, 52);
    assert_checksums_valid(merged);
    assert_eq!(
        merged, &sp,
        "the very super-packet the sender's kernel made"
    );
    assert!(c.is_empty());
}

#[test]
fn only_in_order_segments_of_one_flow_merge() {
    let seg = |port: u16, seq: u32, flags: u8, len: usize| {
        Bytes::from(tcp4([10, 1, 0, 1], port, seq, flags, &payload(len)))
    };
    let m = MSS as u32;
    let udp = {
        let mut p = tcp4([10, 1, 0, 1], 1, 0, 0, &payload(10));
        p[9] = 17;
        Bytes::from(p)
    };
    let mut c = Coalescer::new();
    // Two flows interleaved, each in order: two merged packets.
    c.push(seg(1, 0, TCP_ACK, MSS));
    c.push(seg(2, 0, TCP_ACK, MSS));
    c.push(seg(1, m, TCP_ACK, MSS));
    c.push(udp.clone());
    c.push(seg(2, m, TCP_ACK | TCP_PSH, MSS));
    // After a push, flow 2 starts over.
    c.push(seg(2, 2 * m, TCP_ACK, MSS));
    // A gap in flow 1: not merged, and nothing merges into the earlier run after it.
    c.push(seg(1, 3 * m, TCP_ACK, MSS));
    c.push(seg(1, 2 * m, TCP_ACK, MSS));
    // A segment larger than the run's first does not join it.
    c.push(seg(3, 0, TCP_ACK, 100));
    c.push(seg(3, 100, TCP_ACK, MSS));
    // Control segments go alone.
    c.push(seg(4, 0, TCP_SYN, 0));
    c.push(seg(4, 1, TCP_ACK | TCP_FIN, MSS));
    // A short segment ends a run.
    c.push(seg(5, 0, TCP_ACK, MSS));
    c.push(seg(5, m, TCP_ACK, 100));
    c.push(seg(5, m + 100, TCP_ACK, MSS));
    let out = flush_all(&mut c);
    let summary: Vec<(u16, u32, usize, u8)> = out
        .iter()
        .map(|(h, p)| {
            let port = u16::from_be_bytes([p[20], p[21]]);
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            (port, seq, p.len(), h.gso_type)
        })
        .collect();
    let one = 52 + MSS;
    assert_eq!(
        summary,
        [
            (1, 0, 52 + 2 * MSS, GSO_TCPV4),
            (2, 0, 52 + 2 * MSS, GSO_TCPV4),
            (1, 0, 62, GSO_NONE),
            (2, 2 * m, one, GSO_NONE),
            (1, 3 * m, one, GSO_NONE),
            (1, 2 * m, one, GSO_NONE),
            (3, 0, 152, GSO_NONE),
            (3, 100, one, GSO_NONE),
            (4, 0, 52, GSO_NONE),
            (4, 1, one, GSO_NONE),
            (5, 0, one + 100, GSO_TCPV4),
            (5, m + 100, one, GSO_NONE),
        ]
    );
    for (h, p) in &out {
        if p[9] == IPPROTO_TCP {
            assert_checksums_valid(p);
        }
        if h.gso_type == GSO_NONE {
            assert_eq!(*h, VnetHeader::default());
        }
    }
    assert_eq!(out[2].1, udp.to_vec());
    assert_ne!(out[1].1[33] & TCP_PSH, 0, "the last segment's PSH is kept");
}

#[test]
fn segments_with_different_headers_do_not_merge() {
    let m = MSS as u32;
    let base = tcp4([10, 1, 0, 1], 1, 0, TCP_ACK, &payload(MSS));
    type Edit = fn(&mut Vec<u8>);
    let edits: [(&str, Edit); 4] = [
        ("ack", |p| p[28] ^= 1),
        ("window", |p| p[34] ^= 1),
        ("timestamp", |p| p[51] ^= 1),
        ("ttl", |p| p[8] ^= 1),
    ];
    for (name, edit) in edits {
        let mut next = tcp4([10, 1, 0, 1], 1, m, TCP_ACK, &payload(MSS));
        edit(&mut next);
        let mut c = Coalescer::new();
        c.push(Bytes::from(base.clone()));
        c.push(Bytes::from(next));
        assert_eq!(flush_all(&mut c).len(), 2, "{name}");
    }
}

#[test]
fn a_failed_write_stops_the_flush_and_empties_the_queue() {
    let mut c = Coalescer::new();
    for i in 0..3u16 {
        c.push(Bytes::from(tcp4(
            [10, 1, 0, 1],
            i,
            0,
            TCP_ACK,
            &payload(10),
        )));
    }
    let mut writes = 0;
    let result = c.flush(|_, _| {
        writes += 1;
        Err("gone")
    });
    assert_eq!((result, writes), (Err("gone"), 1));
    assert!(c.is_empty());
}

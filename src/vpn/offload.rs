//! TUN offloads, sans-IO: TCP segmentation of what the kernel reads out as one "super-packet",
//! and coalescing of received TCP segments into one super-packet per write.
//!
//! A TUN interface opened with `IFF_VNET_HDR` puts a 10-byte `virtio_net_hdr` in front of every
//! packet read or written. With `TUNSETOFFLOAD` (`TUN_F_CSUM | TUN_F_TSO4`) the kernel stops
//! segmenting TCP for the interface: one read returns up to 64 KiB of one TCP flow, and one write
//! may hand it as much. A packet then costs the kernel's TCP stack and the agent's system calls
//! once per ~50 segments instead of once per segment.
//!
//! - [`split`]: one read → the MTU-sized IPv4 packets it stands for, with their own IP and TCP
//!   headers and checksums (each goes to a peer as one QUIC datagram, as without offloads: the
//!   wire format does not change, peers without offloads read them as they always did).
//! - [`Coalescer`]: packets received from peers → in-order TCP segments of one flow merged into
//!   one super-packet of up to 64 segments (the kernel completes the TCP checksum:
//!   `VIRTIO_NET_HDR_F_NEEDS_CSUM`), written with one `writev` of the first segment's headers
//!   and every segment's payload where it lies (no copy); everything else written as it came.
//!
//! IPv4 only, as the VPN (IPv6 packets are dropped by the routing checks anyway, so the TUN is
//! not given `TUN_F_TSO6`); UDP segmentation offload (`TUN_F_USO4`) is not asked for either: a
//! UDP super-packet is rare inside the VPN and the kernel segments what it is not offered.
//!
//! Checksums of received segments are not verified before merging: a segment reached us inside
//! an authenticated QUIC packet of the member owning its source address, which computed them;
//! the checksum guards against corruption on links, which the AEAD tag already rules out.

use std::fmt;
use std::io::IoSlice;

use bytes::Bytes;

use crate::chunks::ChunkPool;

/// Length of `struct virtio_net_hdr` (the TUN default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// Largest IP packet a read returns or a write takes (IPv4's 16-bit total length).
pub const MAX_SUPER_PACKET: usize = 65_535;
/// Received packets held for coalescing at once; one more makes [`Coalescer::push`] ask for
/// a flush first.
pub const MAX_COALESCE_ITEMS: usize = 256;
/// Segments merged into one super-packet at most (the kernel's own GRO limit; one `writev`
/// part each, far below `IOV_MAX`).
pub const MAX_MERGED_SEGMENTS: usize = 64;
/// Segment lists kept for reuse between flushes; more are freed.
const MAX_SPARE_VECS: usize = 16;
/// Longest IPv4 + TCP headers (both with the most options).
const MAX_HEADERS_LEN: usize = 60 + 60;
/// Size of each buffer segments are cut from ([`split`]'s `pool`).
pub const SEGMENT_POOL_CHUNK: usize = 128 * 1024;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;

const IPV4_HEADER_LEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const TCP_MIN_HEADER_LEN: usize = 20;
/// Offset of the TCP checksum in the TCP header.
const TCP_CHECKSUM_AT: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr`, in the host's byte order (what a TUN uses unless told otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (IP + TCP) of a super-packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-packet.
    pub gso_size: u16,
    /// Where checksumming starts (with `F_NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// The header at the start of `read` and the packet after it.
    pub fn parse(read: &[u8]) -> Result<(Self, &[u8]), OffloadError> {
        let (h, packet) = read
            .split_first_chunk::<VNET_HDR_LEN>()
            .ok_or(OffloadError::Truncated)?;
        let u16_at = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        let header = Self {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        };
        Ok((header, packet))
    }

    /// The 10 bytes to write in front of a packet.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }
}

/// Why a read could not be turned into packets (the read is dropped, as a malformed packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Shorter than the virtio header, or than the headers it announces.
    Truncated,
    /// A GSO type we did not ask the kernel for.
    UnsupportedGso(u8),
    /// A TCPv4 super-packet that is not IPv4/TCP, or with a segment size of 0.
    NotTcp4,
    /// The checksum position lies outside the packet.
    BadChecksumOffset,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("TUN read shorter than its headers"),
            Self::UnsupportedGso(t) => write!(f, "TUN read with GSO type {t}"),
            Self::NotTcp4 => f.write_str("TCPv4 super-packet that is not TCP over IPv4"),
            Self::BadChecksumOffset => f.write_str("checksum offset outside the packet"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// Turns one read of a TUN with offloads (virtio header + packet) into IP packets, handed to
/// `emit` in order: a TCPv4 super-packet into segments of `gso_size` payload bytes, anything
/// else as it is with its checksum completed if the kernel left it partial. Packets are cut
/// from `pool` (of [`SEGMENT_POOL_CHUNK`] buffers): no allocation each.
pub fn split(
    read: &[u8],
    pool: &mut ChunkPool,
    mut emit: impl FnMut(Bytes),
) -> Result<(), OffloadError> {
    let (header, packet) = VnetHeader::parse(read)?;
    match header.gso_type & !GSO_ECN {
        GSO_NONE => {
            let p = pool.room(packet.len());
            p.extend_from_slice(packet);
            if header.flags & F_NEEDS_CSUM != 0 {
                let start = usize::from(header.csum_start);
                let at = start + usize::from(header.csum_offset);
                if at + 2 > p.len() {
                    return Err(OffloadError::BadChecksumOffset);
                }
                // The field holds the pseudo-header sum: summed with the rest, it completes it.
                let sum = !fold(sum_be(&p[start..], 0));
                // A zero UDP checksum means "none": the kernel writes 0xffff (CSUM_MANGLED_0).
                let check = if sum == 0 { 0xffff } else { sum };
                p[at..at + 2].copy_from_slice(&check.to_be_bytes());
            }
            emit(p.split().freeze());
            Ok(())
        }
        GSO_TCPV4 => segment_tcp4(packet, usize::from(header.gso_size), pool, emit),
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// Where the TCP header of an IPv4 packet starts and how long the headers are together.
fn tcp4_headers(packet: &[u8]) -> Option<(usize, usize)> {
    let first = *packet.first()?;
    if first >> 4 != 4 || packet.len() < IPV4_HEADER_LEN || packet[9] != IPPROTO_TCP {
        return None;
    }
    let ip_len = usize::from(first & 0x0f) * 4;
    let tcp_len = usize::from(*packet.get(ip_len + 12)? >> 4) * 4;
    if ip_len < IPV4_HEADER_LEN || tcp_len < TCP_MIN_HEADER_LEN || ip_len + tcp_len > packet.len() {
        return None;
    }
    Some((ip_len, ip_len + tcp_len))
}

fn segment_tcp4(
    packet: &[u8],
    mss: usize,
    pool: &mut ChunkPool,
    mut emit: impl FnMut(Bytes),
) -> Result<(), OffloadError> {
    let (ip_len, headers_len) = tcp4_headers(packet).ok_or(OffloadError::NotTcp4)?;
    if mss == 0 {
        return Err(OffloadError::NotTcp4);
    }
    let (headers, payload) = packet.split_at(headers_len);
    let id = u16::from_be_bytes([headers[4], headers[5]]);
    let seq = u32::from_be_bytes([
        headers[ip_len + 4],
        headers[ip_len + 5],
        headers[ip_len + 6],
        headers[ip_len + 7],
    ]);
    let flags = headers[ip_len + 13];
    let pseudo = pseudo_sum4(headers, 0);
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or_default();
        let len = headers_len + chunk.len();
        let p = pool.room(len);
        p.extend_from_slice(headers);
        p.extend_from_slice(chunk);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        ipv4_checksum(&mut p[..ip_len]);
        let seq_i = seq.wrapping_add((i * mss) as u32);
        p[ip_len + 4..ip_len + 8].copy_from_slice(&seq_i.to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        p[ip_len + 13] = f;
        let tcp = &mut p[ip_len..];
        tcp[TCP_CHECKSUM_AT..TCP_CHECKSUM_AT + 2].fill(0);
        let sum = fold(sum_be(tcp, pseudo + tcp.len() as u64));
        tcp[TCP_CHECKSUM_AT..TCP_CHECKSUM_AT + 2].copy_from_slice(&(!sum).to_be_bytes());
        emit(p.split().freeze());
    }
    Ok(())
}

/// The IPv4 pseudo-header sum of `ip` without the length (protocol TCP).
fn pseudo_sum4(ip: &[u8], acc: u64) -> u64 {
    sum_be(&ip[12..20], acc + u64::from(IPPROTO_TCP))
}

/// Sets the IPv4 header checksum of `header` (exactly the header).
fn ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let sum = !fold(sum_be(header, 0));
    header[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Adds `data` as big-endian 16-bit words to `acc` (ones' complement sum, unfolded; an odd
/// last byte is padded with zero).
///
/// The words are summed 32 bits at a time in the host's byte order into a 64-bit accumulator
/// (a loop the compiler vectorizes), and the folded result swapped back: a ones' complement sum
/// does not depend on byte order but for that final swap (RFC 1071, 2.B). This is the hot loop
/// of [`split`].
pub fn sum_be(data: &[u8], acc: u64) -> u64 {
    let mut native = 0u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        native += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for w in &mut pairs {
        native += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = pairs.remainder() {
        native += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    acc + u64::from(u16::from_be(fold(native)))
}

/// Folds a ones' complement sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP/IPv4 flow of a segment that may be merged with others of its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    /// Source and destination addresses.
    addrs: [u8; 8],
    /// Source and destination ports.
    ports: [u8; 4],
}

/// A received packet queued for the TUN, alone or with the following segments of its flow.
#[derive(Debug)]
struct Item {
    /// The packet (the first segment of a merged run).
    first: Bytes,
    /// The payloads of the segments merged after it (slices of them: no copy).
    more: Vec<Bytes>,
    /// The TCP flow, for any TCP/IPv4 packet (merged or not).
    flow: Option<Flow>,
    /// Whether a following segment may still be appended.
    open: bool,
    /// Payload bytes of the first segment: every segment but the last has that many.
    gso_size: usize,
    /// Sequence number the next segment must have.
    next_seq: u32,
    /// Headers length (IP + TCP) of the segments.
    headers_len: usize,
    /// Total length of the merged packet.
    len: usize,
    /// A merged segment had PSH set (the last one may).
    push: bool,
}

/// Merges received in-order TCP segments of one flow into super-packets for a TUN with
/// offloads (see the module documentation). Push a turn's packets, then [`flush`](Self::flush).
#[derive(Debug, Default)]
pub struct Coalescer {
    items: Vec<Item>,
    /// Emptied `Item::more` vectors kept for reuse.
    spare: Vec<Vec<Bytes>>,
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether [`push`](Self::push) needs a [`flush`](Self::flush) first.
    pub fn is_full(&self) -> bool {
        self.items.len() >= MAX_COALESCE_ITEMS
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queues `packet` (a checked IP packet): appended to the open super-packet of its flow
    /// when it is that flow's next segment, else queued on its own. When full
    /// ([`is_full`](Self::is_full)), the packet is queued on its own all the same (the bound is
    /// the caller's to keep).
    pub fn push(&mut self, packet: Bytes) {
        let Some(seg) = Segment::parse(&packet) else {
            self.items.push(Item::new(packet, None, 0));
            return;
        };
        let spare = &mut self.spare;
        if let Some(item) = self
            .items
            .iter_mut()
            .rev()
            .find(|i| i.flow == Some(seg.flow))
        {
            if item.open && seg.mergeable && item.append(&packet, &seg, spare) {
                return;
            }
            item.open = false;
        }
        let mut item = Item::new(packet, Some(seg.flow), seg.headers_len);
        item.open = seg.mergeable && seg.flags & TCP_PSH == 0;
        item.gso_size = seg.payload_len;
        item.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
        self.items.push(item);
    }

    /// Hands every queued packet to `write` (virtio header, then the packet's parts in order)
    /// in the order they came (merged segments where their first one came); stops at the
    /// first error `write` returns and gives it back (the rest is dropped).
    pub fn flush<E>(
        &mut self,
        mut write: impl FnMut(&[u8; VNET_HDR_LEN], &[IoSlice<'_>]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut result = Ok(());
        for mut item in self.items.drain(..) {
            if result.is_ok() {
                if item.more.is_empty() {
                    let header = VnetHeader::default().encode();
                    result = write(&header, &[IoSlice::new(&item.first)]);
                } else {
                    let mut head = [0u8; MAX_HEADERS_LEN];
                    let head = &mut head[..item.headers_len];
                    head.copy_from_slice(&item.first[..item.headers_len]);
                    let header = finish_merged(head, item.len, item.gso_size, item.push);
                    let mut parts = [IoSlice::new(&[]); MAX_MERGED_SEGMENTS + 1];
                    parts[0] = IoSlice::new(head);
                    parts[1] = IoSlice::new(&item.first[item.headers_len..]);
                    let n = item.more.len().min(MAX_MERGED_SEGMENTS - 1);
                    for (part, payload) in parts[2..].iter_mut().zip(&item.more[..n]) {
                        *part = IoSlice::new(payload);
                    }
                    result = write(&header.encode(), &parts[..n + 2]);
                }
            }
            if item.more.capacity() > 0 && self.spare.len() < MAX_SPARE_VECS {
                item.more.clear();
                self.spare.push(std::mem::take(&mut item.more));
            }
        }
        result
    }
}

impl Item {
    fn new(first: Bytes, flow: Option<Flow>, headers_len: usize) -> Self {
        Self {
            len: first.len(),
            first,
            more: Vec::new(),
            flow,
            open: false,
            gso_size: 0,
            next_seq: 0,
            headers_len,
            push: false,
        }
    }

    /// Appends `seg` (of `packet`) when it continues this item; false when it does not.
    fn append(&mut self, packet: &Bytes, seg: &Segment, spare: &mut Vec<Vec<Bytes>>) -> bool {
        let fits = seg.seq == self.next_seq
            && seg.headers_len == self.headers_len
            && seg.payload_len <= self.gso_size
            && self.more.len() + 1 < MAX_MERGED_SEGMENTS
            && self.len + seg.payload_len <= MAX_SUPER_PACKET
            && same_headers(&self.first, packet, seg.ip_len, seg.headers_len);
        if !fits {
            return false;
        }
        if self.more.capacity() == 0 {
            self.more = spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(MAX_MERGED_SEGMENTS));
        }
        self.more.push(packet.slice(seg.headers_len..));
        self.len += seg.payload_len;
        self.push |= seg.flags & TCP_PSH != 0;
        self.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
        // A short segment or a push ends the run, as in the kernel's own GRO.
        self.open = seg.payload_len == self.gso_size && seg.flags & TCP_PSH == 0;
        true
    }
}

/// Whether two segments' headers agree but for what changes from segment to segment (IP
/// length, id and checksum; TCP sequence number, checksum and PSH).
fn same_headers(a: &[u8], b: &[u8], ip_len: usize, headers_len: usize) -> bool {
    let t = ip_len;
    a[..2] == b[..2]
        && a[6..10] == b[6..10]
        && a[12..ip_len] == b[12..ip_len]
        && a[t..t + 4] == b[t..t + 4]
        && a[t + 8..t + 13] == b[t + 8..t + 13]
        && (a[t + 13] | TCP_PSH) == (b[t + 13] | TCP_PSH)
        && a[t + 14..t + 16] == b[t + 14..t + 16]
        && a[t + 18..headers_len] == b[t + 18..headers_len]
}

/// Sets a merged packet's IP length and checksum and its TCP checksum to the pseudo-header sum
/// the kernel completes, in `head` (its headers); the virtio header to write it with.
fn finish_merged(head: &mut [u8], total: usize, gso_size: usize, push: bool) -> VnetHeader {
    let ip_len = usize::from(head[0] & 0x0f) * 4;
    head[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ipv4_checksum(&mut head[..ip_len]);
    if push {
        head[ip_len + 13] |= TCP_PSH;
    }
    let tcp_len = (total - ip_len) as u64;
    let pseudo = fold(pseudo_sum4(head, tcp_len));
    head[ip_len + TCP_CHECKSUM_AT..ip_len + TCP_CHECKSUM_AT + 2]
        .copy_from_slice(&pseudo.to_be_bytes());
    VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: head.len() as u16,
        gso_size: gso_size as u16,
        csum_start: ip_len as u16,
        csum_offset: TCP_CHECKSUM_AT as u16,
    }
}

/// What the coalescer needs of a TCP/IPv4 packet.
#[derive(Debug)]
struct Segment {
    flow: Flow,
    ip_len: usize,
    headers_len: usize,
    payload_len: usize,
    seq: u32,
    flags: u8,
    /// Plain data: no IP options or fragments, only ACK (and PSH) set, some payload.
    mergeable: bool,
}

impl Segment {
    fn parse(packet: &[u8]) -> Option<Self> {
        let (ip_len, headers_len) = tcp4_headers(packet)?;
        let t = ip_len;
        let mut addrs = [0u8; 8];
        addrs.copy_from_slice(&packet[12..20]);
        let mut ports = [0u8; 4];
        ports.copy_from_slice(&packet[t..t + 4]);
        let flags = packet[t + 13];
        let fragmented = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
        let payload_len = packet.len() - headers_len;
        let control = TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR;
        let mergeable = ip_len == IPV4_HEADER_LEN
            && !fragmented
            && flags & control == 0
            && flags & TCP_ACK != 0
            && payload_len > 0
            && usize::from(u16::from_be_bytes([packet[2], packet[3]])) == packet.len();
        Some(Self {
            flow: Flow { addrs, ports },
            ip_len,
            headers_len,
            payload_len,
            seq: u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]),
            flags,
            mergeable,
        })
    }
}

#[cfg(test)]
mod tests;

//! Large buffers packets are cut from without an allocation each ([`ChunkPool`]); a buffer is
//! used again once every packet cut from it has been dropped.
//!
//! Packets cut from one buffer share it ([`bytes::Bytes`]), so the buffer lives until the last
//! of them is gone (sent, written to the TUN interface). Before, a full buffer was let go and a
//! new one allocated: at VPN speeds that is thousands of 128 KiB allocations a second, which
//! the allocator serves with `mmap`/`munmap` or by growing and trimming its heap, and every
//! page of each new buffer then costs a page fault on first write (8,000 to 100,000 faults in
//! 4 s of one TCP stream at the receiving agent; 0 to 3,000 with the pool). A pool keeps the
//! last few buffers it let go and takes one back as soon as nothing refers to it any more.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Most full buffers a pool keeps for reuse ([`ChunkPool::new`]'s `keep`).
pub const MAX_RETIRED_CHUNKS: usize = 16;

/// A buffer to append packets to and split them off (`BytesMut::split`), refilled from buffers
/// whose packets are all dropped before a new one is allocated.
#[derive(Debug)]
pub struct ChunkPool {
    /// Size of each buffer allocated.
    chunk: usize,
    /// Full buffers kept for reuse (see [`ChunkPool::new`]).
    keep: usize,
    current: BytesMut,
    /// Buffers let go, oldest first; each is the empty rest of a buffer after its last split.
    retired: VecDeque<BytesMut>,
    /// Whether `current` is (or was) an allocated buffer rather than the initial empty one.
    allocated: bool,
}

impl ChunkPool {
    /// An empty pool allocating buffers of `chunk` bytes (or of a larger request) and keeping
    /// the last `keep` full ones (at most [`MAX_RETIRED_CHUNKS`]) while packets cut from them
    /// may still be alive; older ones are let go (freed with their last packet). Once traffic
    /// stops, at most `keep + 1` buffers stay allocated. `keep` should cover what is in flight:
    /// a buffer is taken back only when all its packets are gone.
    pub fn new(chunk: usize, keep: usize) -> Self {
        Self {
            chunk,
            keep: keep.min(MAX_RETIRED_CHUNKS),
            current: BytesMut::new(),
            retired: VecDeque::new(),
            allocated: false,
        }
    }

    /// The buffer in use, with at least `room` bytes of spare capacity: the current one if it
    /// has them, else a retired buffer nothing refers to any more, else a new one. What was
    /// appended to the current buffer and not split off is dropped when it is replaced.
    pub fn room(&mut self, room: usize) -> &mut BytesMut {
        if self.current.capacity() - self.current.len() >= room {
            return &mut self.current;
        }
        let size = self.chunk.max(room);
        let mut old = std::mem::take(&mut self.current);
        old.clear();
        // The empty tail of a full buffer has no capacity of its own left, yet the whole
        // buffer comes back with `try_reclaim` once nothing else refers to it. (A pool that
        // never allocated has nothing to keep.)
        if self.allocated {
            self.retired.push_back(old);
            if self.retired.len() > self.keep {
                self.retired.pop_front();
            }
        }
        let reusable = self
            .retired
            .iter_mut()
            .position(|buf| buf.try_reclaim(size));
        self.current = match reusable.and_then(|i| self.retired.remove(i)) {
            Some(buf) => buf,
            None => {
                self.allocated = true;
                BytesMut::with_capacity(size)
            }
        };
        &mut self.current
    }

    /// The buffer in use (for `split` after appending).
    pub fn current(&mut self) -> &mut BytesMut {
        &mut self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the pool's buffer with `n` packets of `len` bytes and splits each off.
    fn cut(pool: &mut ChunkPool, n: usize, len: usize) -> Vec<bytes::Bytes> {
        (0..n)
            .map(|i| {
                let buf = pool.room(len);
                buf.extend(std::iter::repeat_n(i as u8, len));
                buf.split().freeze()
            })
            .collect()
    }

    #[test]
    fn a_buffer_is_reused_once_its_packets_are_dropped() {
        let mut pool = ChunkPool::new(1000, 4);
        let first = cut(&mut pool, 10, 100);
        let first_buffer = first[0].as_ptr();
        // Full: the next packet needs another buffer; the first is still referred to.
        let second = cut(&mut pool, 1, 100);
        assert_ne!(second[0].as_ptr(), first_buffer);
        assert!(
            first
                .iter()
                .enumerate()
                .all(|(i, p)| p[..] == [i as u8; 100])
        );
        drop(first);
        // The second buffer fills; the first, now unshared, comes back instead of a new one.
        let more = cut(&mut pool, 10, 100);
        assert!(
            more.iter().any(|p| p.as_ptr() == first_buffer),
            "the dropped buffer is used again"
        );
        assert_eq!(
            &second[0][..],
            &[0u8; 100][..],
            "live packets are untouched"
        );
    }

    #[test]
    fn buffers_still_shared_are_never_written_and_few_are_kept() {
        let mut pool = ChunkPool::new(256, 4);
        let kept: Vec<_> = (0..20).flat_map(|_| cut(&mut pool, 2, 128)).collect();
        // Every packet intact although far more buffers than the pool keeps were filled.
        for pair in kept.chunks(2) {
            assert_eq!(&pair[0][..], &[0u8; 128][..]);
            assert_eq!(&pair[1][..], &[1u8; 128][..]);
        }
        assert!(pool.retired.len() <= 4);
    }

    #[test]
    fn a_request_larger_than_the_chunk_gets_a_buffer_of_its_size() {
        let mut pool = ChunkPool::new(64, 4);
        assert!(pool.room(500).capacity() >= 500);
        let p = cut(&mut pool, 1, 500);
        assert_eq!(p[0].len(), 500);
    }
}

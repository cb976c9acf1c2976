//! The ledger's append-only journal beside its snapshot: a save appends what changed since the
//! last one (O(change), one `fdatasync`), and only when the journal has grown past the ledger's
//! own size ([`MIN_COMPACT_BYTES`] at least) is the whole snapshot rewritten and the journal
//! removed (compaction), so a busy ledger costs each save what changed, not the whole ledger.
//!
//! ```text
//! journal = magic "KPJOURNL" | u8 version (1) | record*
//! record  = u32 len | payload (len bytes) | first 8 bytes of SHA-256(payload)
//! payload = u8 0 | entry | u8 flags (1 suspect)                  -- an entry as stored
//!         | u8 1 | u64 last contact | u64 quarantined since      -- (u64::MAX: none)
//! ```
//!
//! Loading replays the journal over the snapshot with the ordinary merge (signatures checked),
//! and stops at the first torn or damaged record (a crash in the middle of an append): what was
//! acknowledged before it is there. A failed append makes the next save a compaction, so
//! nothing is ever appended behind a torn record.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::disk::{FileDisk, LedgerDisk};
use super::entry::MAX_VALUE_WIRE;
use super::store::Admit;
use super::{Entry, Ledger, LedgerError};
use crate::wire::{Reader, WireError, Writer};

/// First bytes of a journal file.
pub const JOURNAL_MAGIC: [u8; 8] = *b"KPJOURNL";
/// Journal format version written by this build.
pub const JOURNAL_VERSION: u8 = 1;
/// The journal is compacted into the snapshot once it is larger than the ledger and than this.
pub const MIN_COMPACT_BYTES: u64 = 1024 * 1024;

const KIND_ENTRY: u8 = 0;
const KIND_CONTACT: u8 = 1;
const FLAG_SUSPECT: u8 = 1;
const NONE: u64 = u64::MAX;
const SUM_LEN: usize = 8;
const HEADER_LEN: usize = JOURNAL_MAGIC.len() + 1;

/// What the ledger remembers between saves.
#[derive(Debug, Clone, Default)]
pub(crate) struct JournalState {
    /// Keys stored or re-flagged since the last save.
    pub(crate) dirty: BTreeSet<(String, String)>,
    /// A key was removed (expiry, quarantine): only a full snapshot records that.
    pub(crate) needs_full: bool,
    /// Bytes in the journal file, when it is known to continue the snapshot on disk (`None`:
    /// the next save writes a full snapshot).
    pub(crate) bytes: Option<u64>,
}

/// How a save went about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    /// Nothing had changed.
    Unchanged,
    /// The changes were appended to the journal (this many bytes).
    Appended(u64),
    /// The whole snapshot was written and the journal removed.
    Compacted,
}

/// The journal file of the snapshot at `path` (`<snapshot>.journal`).
#[must_use]
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    path.with_file_name(name)
}

fn record(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
    out.extend_from_slice(&Sha256::digest(payload)[..SUM_LEN]);
}

impl Ledger {
    /// Saves what changed since the last save: appended to the journal, or, when the journal
    /// grew past the ledger's size (or a key was removed, or no journal continues the snapshot),
    /// as a whole new snapshot (see the module documentation).
    pub fn persist(&mut self, path: &Path) -> Result<Persisted, LedgerError> {
        self.persist_to(&mut FileDisk::new(path))
    }

    /// [`persist`](Self::persist) to any [`LedgerDisk`]: the agent's files or the simulator's
    /// [`MemoryDisk`](super::disk::MemoryDisk). The bytes and the choice between an append and a
    /// whole snapshot are the same for both.
    pub fn persist_to<D: LedgerDisk>(&mut self, disk: &mut D) -> Result<Persisted, LedgerError> {
        let limit = (self.total_bytes() as u64).max(MIN_COMPACT_BYTES);
        let full = self.journal.needs_full || self.journal.bytes.is_none_or(|b| b > limit);
        if full {
            disk.write_snapshot(self.encode_snapshot()?)?;
            disk.remove_journal()?;
            self.journal = JournalState {
                bytes: Some(0),
                ..JournalState::default()
            };
            return Ok(Persisted::Compacted);
        }
        if self.journal.dirty.is_empty() {
            return Ok(Persisted::Unchanged);
        }
        let records = self.journal_records()?;
        match disk.append_journal(self.journal.bytes == Some(0), &records) {
            Ok(n) => {
                self.journal.bytes = self.journal.bytes.map(|b| b + n);
                self.journal.dirty.clear();
                Ok(Persisted::Appended(n))
            }
            Err((error, cut_back)) => {
                // Half a record left at the end (it could not be cut off): the next save starts
                // over from a snapshot.
                if !cut_back {
                    self.journal.needs_full = true;
                }
                Err(error)
            }
        }
    }

    /// The journal records of what changed since the last save: each dirty entry as stored,
    /// then the contact state.
    fn journal_records(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        let mut payload = Vec::new();
        for (bucket, key) in &self.journal.dirty {
            let Some(stored) = self.buckets.get(bucket).and_then(|b| b.entries.get(key)) else {
                continue;
            };
            payload.clear();
            let mut w = Writer::new(&mut payload);
            w.u8(KIND_ENTRY);
            stored.entry.encode(&mut w)?;
            w.u8(if stored.suspect { FLAG_SUSPECT } else { 0 });
            record(&payload, &mut out);
        }
        payload.clear();
        Writer::new(&mut payload)
            .u8(KIND_CONTACT)
            .u64(self.last_contact_ms.unwrap_or(NONE))
            .u64(self.quarantined_at.unwrap_or(NONE));
        record(&payload, &mut out);
        Ok(out)
    }

    /// Replays journal bytes (header included) over this ledger, just loaded from the snapshot
    /// they continue, up to the first torn or damaged record, and notes where the next append
    /// goes (or that the next save must be a snapshot).
    pub(crate) fn replay_journal(&mut self, bytes: &[u8]) -> Replayed {
        if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != journal_header() {
            return Replayed {
                bad_header: true,
                ..Replayed::default()
            };
        }
        let mut at = HEADER_LEN;
        let mut records = 0usize;
        let trusted = Admit {
            verify: true,
            future: false,
            now: None,
        };
        while let Some(payload) = next_record(bytes, at) {
            at += 4 + payload.len() + SUM_LEN;
            records += 1;
            let mut r = Reader::new(payload);
            match r.u8() {
                Ok(KIND_ENTRY) => {
                    let Ok(entry) =
                        Entry::decode(&mut r, self.limits().max_value_bytes.min(MAX_VALUE_WIRE))
                    else {
                        break;
                    };
                    let suspect = r.u8().is_ok_and(|f| f & FLAG_SUSPECT != 0);
                    let (bucket, key) = (entry.bucket.clone(), entry.key.clone());
                    match self.admit(entry, trusted) {
                        Ok(_) => self.set_suspect(&bucket, &key, suspect),
                        Err(e) => log::warn!("ledger journal: skipping {bucket}/{key}: {e}"),
                    }
                }
                Ok(KIND_CONTACT) => {
                    let (Ok(contact), Ok(quarantined)) = (r.u64(), r.u64()) else {
                        break;
                    };
                    self.last_contact_ms = (contact != NONE).then_some(contact);
                    self.quarantined_at =
                        (quarantined != NONE && self.suspects > 0).then_some(quarantined);
                }
                _ => break,
            }
        }
        let torn_bytes = bytes.len() - at;
        if torn_bytes > 0 {
            // Appending after the torn bytes would hide what follows: compact at the next save.
            self.journal.needs_full = true;
        }
        self.journal.bytes = Some(at as u64);
        self.journal.dirty.clear();
        while self.poll_event().is_some() {}
        Replayed {
            bad_header: false,
            records,
            torn_bytes,
        }
    }
}

/// What replaying a journal found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// The journal had no valid header and was ignored.
    pub bad_header: bool,
    /// Whole records replayed.
    pub records: usize,
    /// Bytes ignored after the last whole record (a torn write).
    pub torn_bytes: usize,
}

/// The first bytes of every journal.
pub(crate) fn journal_header() -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..JOURNAL_MAGIC.len()].copy_from_slice(&JOURNAL_MAGIC);
    header[JOURNAL_MAGIC.len()] = JOURNAL_VERSION;
    header
}

/// The payload of the record at `at`, if it is whole and its checksum matches.
fn next_record(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    let payload = bytes.get(at + 4..(at + 4).checked_add(len)?)?;
    let sum = bytes.get(at + 4 + len..at + 4 + len + SUM_LEN)?;
    (Sha256::digest(payload)[..SUM_LEN] == *sum).then_some(payload)
}

/// Appends `records` to the journal at `path` (0600; with a header when `fresh`), syncs it, and
/// returns the bytes written. On failure (a full disk), the file is cut back to where it was,
/// so no torn record stays; the error says whether that worked.
pub(crate) fn append(path: &Path, fresh: bool, records: &[u8]) -> Result<u64, (io::Error, bool)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| (e, true))?;
    let start = file.metadata().map_err(|e| (e, true))?.len();
    write_records(&file, path, fresh, records).map_err(|e| {
        let cut_back = file.set_len(start).and_then(|()| file.sync_data()).is_ok();
        (e, cut_back)
    })
}

fn write_records(mut file: &File, path: &Path, fresh: bool, records: &[u8]) -> io::Result<u64> {
    let mut n = 0u64;
    if fresh || file.metadata()?.len() == 0 {
        file.set_len(0)?;
        file.write_all(&journal_header())?;
        n += HEADER_LEN as u64;
    }
    file.write_all(records)?;
    file.sync_data()?;
    if fresh {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(n + records.len() as u64)
}

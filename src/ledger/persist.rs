//! The ledger snapshot on disk: versioned, checksummed, written atomically, private (0600).
//!
//! ```text
//! snapshot = magic "KPLEDGER" | u8 version (1)
//!            | u64 last contact (u64::MAX: never) | u64 quarantined since (u64::MAX: no)
//!            | u32 n | n x (entry | u8 flags (1 suspect))
//!            | SHA-256 of everything before (32)
//! ```
//!
//! Loading checks the checksum (a truncated or damaged file is [`LedgerError::Corrupt`], naming the
//! file; the caller decides whether to start empty), then verifies every entry's signature and
//! skips (counts and logs) those that fail.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::entry::MAX_VALUE_WIRE;
use super::journal::{Replayed, journal_path};
use super::store::Admit;
use super::{Entry, Ledger, LedgerError, Limits};
use crate::wire::{Reader, WireError, Writer};

/// First bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"KPLEDGER";
/// Snapshot format version written by this build.
pub const SNAPSHOT_VERSION: u8 = 1;

const NONE: u64 = u64::MAX;
const FLAG_SUSPECT: u8 = 1;
const CHECKSUM_LEN: usize = 32;
/// Smallest encoded entry plus its flags byte.
const MIN_RECORD: usize = 2 + 1 + 2 + 1 + 1 + 8 + 32 + 64 + 1;

impl Ledger {
    /// Writes the snapshot atomically: a private temporary file (0600) in the same directory,
    /// fsync, rename over `path`, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<(), LedgerError> {
        write_snapshot_file(path, &self.encode_snapshot()?)
    }

    /// Removes the temporary files that saves of earlier runs left next to `path` when they
    /// were killed half-way (each run names its own after its pid, so they would pile up on a
    /// small disk); returns how many. Call it before this run saves.
    pub fn remove_stale_temporaries(path: &Path) -> usize {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return 0;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let name = name.to_string_lossy();
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| is_temporary_of(&e.file_name().to_string_lossy(), &name))
            .filter(|e| fs::remove_file(e.path()).is_ok())
            .count()
    }

    /// Loads a snapshot and replays its journal. A missing file is an empty ledger; an
    /// unreadable or corrupt one is an error naming the file. Entries whose signature fails, or
    /// that no longer fit `limits`, are skipped, counted in [`Ledger::counters`] and logged.
    pub fn load(path: &Path, limits: Limits) -> Result<Ledger, LedgerError> {
        let cap = max_snapshot_len(&limits);
        // One byte over the cap, so that an oversized snapshot is told from one at the cap.
        let snapshot = read_capped(path, cap.saturating_add(1))?;
        let journal = journal_path(path);
        let journal_bytes = read_capped(&journal, cap)?;
        let (ledger, replayed) =
            Ledger::from_disk_bytes(snapshot.as_deref(), journal_bytes.as_deref(), limits)
                .map_err(|reason| LedgerError::Corrupt {
                    path: path.to_path_buf(),
                    reason,
                })?;
        if replayed.bad_header {
            log::warn!(
                "ledger journal {} has no valid header: ignored",
                journal.display()
            );
        } else if replayed.torn_bytes > 0 {
            log::warn!(
                "ledger journal {}: ignoring {} bytes after {} records (a torn write)",
                journal.display(),
                replayed.torn_bytes,
                replayed.records
            );
        }
        let c = ledger.counters();
        if c.bad_signature + c.invalid + c.rejected_full > 0 {
            log::warn!(
                "ledger snapshot {}: skipped {} entries with bad signatures, {} invalid, {} over the limits",
                path.display(),
                c.bad_signature,
                c.invalid,
                c.rejected_full
            );
        }
        Ok(ledger)
    }

    /// Loads a ledger from what its disk holds: the snapshot's and the journal's bytes (`None`:
    /// no such file). The snapshot must be whole (checksummed) and within `limits`; the journal
    /// is replayed over it up to its first torn record. Pure: [`load`](Self::load) and the
    /// simulator's virtual disk both go through it. The error says what is wrong with the
    /// snapshot.
    pub(crate) fn from_disk_bytes(
        snapshot: Option<&[u8]>,
        journal: Option<&[u8]>,
        limits: Limits,
    ) -> Result<(Ledger, Replayed), String> {
        let cap = max_snapshot_len(&limits);
        let mut ledger = match snapshot {
            Some(bytes) if bytes.len() > cap => {
                return Err(format!("larger than the ledger limits allow ({cap} bytes)"));
            }
            Some(bytes) => Ledger::decode_snapshot(bytes, limits)?,
            // A journal without its snapshot (a compaction cut short) still holds writes.
            None => Ledger::new(limits),
        };
        let replayed = match journal {
            Some(bytes) => ledger.replay_journal(bytes.get(..cap).unwrap_or(bytes)),
            None => {
                // Appends continue a snapshot; with none, the next save writes one.
                ledger.journal.bytes = snapshot.map(|_| 0);
                Replayed::default()
            }
        };
        Ok((ledger, replayed))
    }

    /// The snapshot bytes.
    pub(crate) fn encode_snapshot(&self) -> Result<Vec<u8>, WireError> {
        let mut buf = Vec::with_capacity(self.total_bytes() + 64);
        let mut w = Writer::new(&mut buf);
        w.bytes(&SNAPSHOT_MAGIC)
            .u8(SNAPSHOT_VERSION)
            .u64(self.last_contact_ms.unwrap_or(NONE))
            .u64(self.quarantined_at.unwrap_or(NONE));
        let n = u32::try_from(self.len()).map_err(|_| WireError::TooLong {
            field: "snapshot entries",
            len: self.len(),
            max: u32::MAX as usize,
        })?;
        w.u32(n);
        for s in self.buckets.values().flat_map(|b| b.entries.values()) {
            s.entry.encode(&mut w)?;
            w.u8(if s.suspect { FLAG_SUSPECT } else { 0 });
        }
        let sum: [u8; 32] = Sha256::digest(&buf).into();
        buf.extend_from_slice(&sum);
        Ok(buf)
    }

    /// Parses snapshot bytes; the error says what is wrong.
    pub(crate) fn decode_snapshot(bytes: &[u8], limits: Limits) -> Result<Ledger, String> {
        let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
            return Err(format!("only {} bytes", bytes.len()));
        };
        let (body, sum) = bytes.split_at(body_len);
        let mut r = Reader::new(body);
        let magic: [u8; 8] = r.array().map_err(|_| "too short for a header".to_owned())?;
        if magic != SNAPSHOT_MAGIC {
            return Err("not a ledger snapshot (bad magic)".to_owned());
        }
        let version = r.u8().map_err(|e| e.to_string())?;
        if version != SNAPSHOT_VERSION {
            return Err(format!("unsupported snapshot version {version}"));
        }
        let expected: [u8; 32] = Sha256::digest(body).into();
        if sum != expected {
            return Err("checksum mismatch (truncated or damaged)".to_owned());
        }
        let decode = |r: &mut Reader<'_>| -> Result<_, WireError> {
            let contact = r.u64()?;
            let quarantined = r.u64()?;
            let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            if n > r.remaining() / MIN_RECORD {
                return Err(WireError::Truncated {
                    needed: n.saturating_mul(MIN_RECORD),
                    remaining: r.remaining(),
                });
            }
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let e = Entry::decode(r, limits.max_value_bytes.min(MAX_VALUE_WIRE))?;
                let flags = r.u8()?;
                if flags & !FLAG_SUSPECT != 0 {
                    return Err(WireError::UnknownTag {
                        field: "snapshot entry flags",
                        tag: flags,
                    });
                }
                records.push((e, flags & FLAG_SUSPECT != 0));
            }
            Ok((contact, quarantined, records))
        };
        let (contact, quarantined, records) = decode(&mut r).map_err(|e| e.to_string())?;
        r.finish().map_err(|e| e.to_string())?;
        let mut ledger = Ledger::new(limits);
        let trusted = Admit {
            verify: true,
            future: false,
            now: None,
        };
        for (entry, suspect) in records {
            let (bucket, key) = (entry.bucket.clone(), entry.key.clone());
            match ledger.admit(entry, trusted) {
                Ok(_) => {
                    if suspect {
                        ledger.set_suspect(&bucket, &key, true);
                    }
                }
                Err(e) => log::warn!("ledger snapshot: skipping {bucket}/{key}: {e}"),
            }
        }
        ledger.last_contact_ms = (contact != NONE).then_some(contact);
        ledger.quarantined_at = (quarantined != NONE && ledger.suspects > 0).then_some(quarantined);
        // Loading is not news: the node reads the ledger after loading it.
        while ledger.poll_event().is_some() {}
        ledger.journal.dirty.clear();
        Ok(ledger)
    }
}

/// Writes snapshot `bytes` to `path` atomically: a private temporary file (0600) in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub(crate) fn write_snapshot_file(path: &Path, bytes: &[u8]) -> Result<(), LedgerError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |error| LedgerError::Io { path: p, error }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| LedgerError::Io {
            path: path.to_path_buf(),
            error: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    let tmp = dir.join(temporary_name(&name, std::process::id()));
    let written = write_private(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))
}

/// At most `cap` bytes of the file at `path` (`None`: there is no such file).
fn read_capped(path: &Path, cap: usize) -> Result<Option<Vec<u8>>, LedgerError> {
    let io_err = |error| LedgerError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(u64::try_from(cap).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    Ok(Some(bytes))
}

/// The temporary file a save by process `pid` writes before renaming it over `name`.
fn temporary_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}.tmp")
}

/// Whether `file` is a temporary file of a save of `name` (by any process).
fn is_temporary_of(file: &str, name: &str) -> bool {
    file.strip_prefix('.')
        .and_then(|f| f.strip_prefix(name))
        .and_then(|f| f.strip_prefix('.'))
        .and_then(|f| f.strip_suffix(".tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The largest snapshot `limits` can produce, with room for the header and checksum.
fn max_snapshot_len(limits: &Limits) -> usize {
    limits
        .max_total_bytes
        .saturating_add(limits.max_entries)
        .saturating_add(1024)
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    let mut file = match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left over from a crash of this pid's predecessor.
            fs::remove_file(path)?;
            open()?
        }
        other => other?,
    };
    file.write_all(bytes)?;
    file.sync_all()
}

//! Node identity: the ed25519 key kept in the state directory, and the peer id derived from it.
//!
//! The peer id is printed the way libp2p (and so edgevpn) prints ed25519 peer ids
//! (`12D3KooW...`): base58btc of an identity multihash of the protobuf-encoded public key. Kairos
//! users see the same shape of id they know, and `/p2p/<id>` multiaddrs they already hold parse.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};

/// Default state directory, next to Kairos' own state on its images.
pub const DEFAULT_STATE_DIR: &str = "/usr/local/.kairos-p2p";
/// Environment variable that overrides the state directory (a `--state-dir` flag wins over it).
pub const STATE_DIR_ENV: &str = "KAIROS_P2P_STATE_DIR";
/// File name of the node key inside the state directory.
pub const KEY_FILE: &str = "identity.key";

/// Picks the state directory: the flag, else `$KAIROS_P2P_STATE_DIR`, else the default.
pub fn resolve_state_dir(flag: Option<PathBuf>, env_value: Option<String>) -> PathBuf {
    flag.or_else(|| env_value.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Why the node identity could not be loaded or created.
#[derive(Debug)]
pub enum IdentityError {
    /// The state directory could not be created or used.
    StateDir(PathBuf, io::Error),
    /// The key file could not be read or written.
    Io(PathBuf, io::Error),
    /// The key file exists but does not hold a key.
    Corrupt(PathBuf, usize),
    /// The operating system's random generator failed.
    Random(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StateDir(p, e) => write!(f, "state directory {}: {e}", p.display()),
            Self::Io(p, e) => write!(f, "node key {}: {e}", p.display()),
            Self::Corrupt(p, n) => write!(
                f,
                "node key {}: holds {n} bytes, expected 32 (move it away to create a new identity)",
                p.display()
            ),
            Self::Random(e) => write!(f, "system random generator failed: {e}"),
        }
    }
}

impl std::error::Error for IdentityError {}

/// A node's long-term key pair.
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Builds an identity from a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.key.verifying_key().to_bytes())
    }

    /// The signing key, for the layers that sign (TLS certificate, ledger entries).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Loads the key from `state_dir`, creating the directory (0700) and the key (0600) the first
    /// time. Creation is atomic: the key is written to a private temporary file, synced, then
    /// linked into place, so a crash never leaves a half-written key and two processes racing
    /// end up with the same identity.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        ensure_private_dir(state_dir)?;
        let path = state_dir.join(KEY_FILE);
        match read_key(&path) {
            Ok(identity) => return Ok(identity),
            Err(IdentityError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        let tmp = state_dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
        let written = write_private(&tmp, &seed);
        seed.fill(0);
        written.map_err(|e| IdentityError::Io(tmp.clone(), e))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(state_dir).map_err(|e| IdentityError::StateDir(state_dir.into(), e))?;
                log::info!("created node key {}", path.display());
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(IdentityError::Io(path, e)),
        }
        read_key(&path)
    }
}

fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let err = |e| IdentityError::StateDir(dir.to_path_buf(), e);
    if !dir.exists() {
        // Created 0700, missing parents too (a parent left to the umask, possibly 0777, would let
        // another user swap the private directory for one of theirs); then exactly 0700 whatever
        // the umask took away.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_key(path: &Path) -> Result<Identity, IdentityError> {
    let err = |e| IdentityError::Io(path.to_path_buf(), e);
    let file = File::open(path).map_err(err)?;
    let mode = file.metadata().map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        log::warn!(
            "node key {} was readable by others (mode {:o}); setting 0600",
            path.display(),
            mode & 0o777
        );
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    let mut buf = Vec::with_capacity(33);
    file.take(33).read_to_end(&mut buf).map_err(err)?;
    let seed: [u8; 32] = buf
        .as_slice()
        .try_into()
        .map_err(|_| IdentityError::Corrupt(path.into(), buf.len()))?;
    buf.fill(0);
    Ok(Identity::from_seed(seed))
}

/// A peer's identity: its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 32]);

/// The libp2p prefix of an ed25519 peer id: identity multihash (0x00, length 36) of the protobuf
/// `PublicKey { Type: Ed25519 (1), Data: 32 bytes }`.
const LIBP2P_ED25519_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

impl PeerId {
    /// The public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key as a verifying key, if the bytes are a valid curve point.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = [0u8; 38];
        bytes[..6].copy_from_slice(&LIBP2P_ED25519_PREFIX);
        bytes[6..].copy_from_slice(&self.0);
        f.write_str(&base58::encode(&bytes))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

/// Why a printed peer id did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdError {
    /// A character outside the base58 alphabet.
    NotBase58,
    /// Valid base58, but not an ed25519 libp2p peer id.
    NotEd25519,
}

impl fmt::Display for PeerIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotBase58 => f.write_str("peer id is not base58"),
            Self::NotEd25519 => f.write_str("peer id is not an ed25519 peer id (12D3KooW...)"),
        }
    }
}

impl std::error::Error for PeerIdError {}

impl FromStr for PeerId {
    type Err = PeerIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 64 {
            return Err(PeerIdError::NotEd25519);
        }
        let bytes = base58::decode(s).ok_or(PeerIdError::NotBase58)?;
        let key = bytes
            .strip_prefix(&LIBP2P_ED25519_PREFIX[..])
            .ok_or(PeerIdError::NotEd25519)?;
        let key: [u8; 32] = key.try_into().map_err(|_| PeerIdError::NotEd25519)?;
        Ok(PeerId(key))
    }
}

/// Bitcoin-alphabet base58, as multibase `z` / libp2p use it. Small inputs only (peer ids).
mod base58 {
    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

    pub fn encode(input: &[u8]) -> String {
        let zeros = input.iter().take_while(|&&b| b == 0).count();
        // Base-58 digits, least significant first.
        let mut digits: Vec<u8> = Vec::with_capacity(input.len() * 138 / 100 + 1);
        for &byte in &input[zeros..] {
            let mut carry = u32::from(byte);
            for d in digits.iter_mut() {
                carry += u32::from(*d) << 8;
                *d = (carry % 58) as u8;
                carry /= 58;
            }
            while carry > 0 {
                digits.push((carry % 58) as u8);
                carry /= 58;
            }
        }
        let mut out = String::with_capacity(zeros + digits.len());
        out.extend(std::iter::repeat_n('1', zeros));
        out.extend(
            digits
                .iter()
                .rev()
                .map(|&d| char::from(ALPHABET[usize::from(d)])),
        );
        out
    }

    pub fn decode(input: &str) -> Option<Vec<u8>> {
        let zeros = input.bytes().take_while(|&b| b == b'1').count();
        // Bytes, least significant first.
        let mut bytes: Vec<u8> = Vec::with_capacity(input.len());
        for c in input.bytes().skip(zeros) {
            let mut carry = ALPHABET.iter().position(|&a| a == c)? as u32;
            for b in bytes.iter_mut() {
                carry += u32::from(*b) * 58;
                *b = (carry & 0xff) as u8;
                carry >>= 8;
            }
            while carry > 0 {
                bytes.push((carry & 0xff) as u8);
                carry >>= 8;
            }
        }
        let mut out = vec![0u8; zeros];
        out.extend(bytes.iter().rev());
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kairos-p2p-id-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn base58_round_trips_and_keeps_leading_zeros() {
        for input in [&b""[..], b"\0", b"\0\0abc", b"hello world", &[0xff; 40]] {
            assert_eq!(base58::decode(&base58::encode(input)).unwrap(), input);
        }
        assert_eq!(base58::encode(b"hello world"), "StV1DL6CwTryKyV");
        assert_eq!(base58::decode("0OIl"), None);
    }

    #[test]
    fn peer_id_prints_like_libp2p_and_parses_back() {
        let id = Identity::from_seed([7; 32]).peer_id();
        let text = id.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.len(), 52);
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
    }

    #[test]
    fn malformed_peer_ids_are_typed_errors() {
        assert_eq!("not-base58!".parse::<PeerId>(), Err(PeerIdError::NotBase58));
        assert_eq!(
            "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".parse::<PeerId>(),
            Err(PeerIdError::NotEd25519)
        );
        assert_eq!(
            "1".repeat(100).parse::<PeerId>(),
            Err(PeerIdError::NotEd25519)
        );
    }

    #[test]
    fn key_is_created_once_private_and_reloaded() {
        let dir = temp_dir("create");
        let first = Identity::load_or_create(&dir).unwrap().peer_id();
        let second = Identity::load_or_create(&dir).unwrap().peer_id();
        assert_eq!(first, second);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loose_key_permissions_are_tightened() {
        let dir = temp_dir("loose");
        Identity::load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        Identity::load_or_create(&dir).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_key_is_reported_not_replaced() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(KEY_FILE), b"short").unwrap();
        let err = Identity::load_or_create(&dir).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt(_, 5)), "{err}");
        assert_eq!(fs::read(dir.join(KEY_FILE)).unwrap(), b"short");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_dir_precedence_is_flag_then_env_then_default() {
        let flag = Some(PathBuf::from("/flag"));
        let env = Some("/env".to_string());
        assert_eq!(resolve_state_dir(flag, env.clone()), PathBuf::from("/flag"));
        assert_eq!(resolve_state_dir(None, env), PathBuf::from("/env"));
        assert_eq!(
            resolve_state_dir(None, Some(String::new())),
            PathBuf::from(DEFAULT_STATE_DIR)
        );
        assert_eq!(
            resolve_state_dir(None, None),
            PathBuf::from(DEFAULT_STATE_DIR)
        );
    }
}

//! The root key: the one secret an operator supplies. It only wraps key-store keys.

use std::fs;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::KeyError;
use super::files;
use crate::crypto::{Argon2Params, KEY_LEN, SecretKey, derive_key, key_from_passphrase};

/// Where the root key comes from. Resolved by `config`; loaded here.
#[derive(Clone)]
pub enum RootKeySource {
    /// A file holding 32 raw bytes or 64 hex characters. Must not be group/world readable.
    File(PathBuf),
    /// 64 hex characters, typically from the `CHATVAULT_ROOT_KEY` environment variable.
    Hex(Zeroizing<String>),
    /// A passphrase stretched with argon2id; the salt is kept in the key directory.
    Passphrase(Zeroizing<String>),
    /// A file holding the passphrase (one line). Must not be group/world readable.
    PassphraseFile(PathBuf),
    /// Development only: generate a key into this file on first start, then reuse it.
    Development(PathBuf),
}

impl std::fmt::Debug for RootKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootKeySource::File(p) => write!(f, "File({})", p.display()),
            RootKeySource::Hex(_) => f.write_str("Hex(<redacted>)"),
            RootKeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            RootKeySource::PassphraseFile(p) => write!(f, "PassphraseFile({})", p.display()),
            RootKeySource::Development(p) => write!(f, "Development({})", p.display()),
        }
    }
}

/// How a passphrase-derived root key is re-derived: stored in the key directory.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PassphraseSalt {
    pub salt: [u8; 16],
    pub params: Argon2Params,
}

/// The operator's root key, and the two purposes it is used for.
pub struct RootKey {
    wrap: SecretKey,
    control: SecretKey,
    check: [u8; 16],
}

impl RootKey {
    /// Splits the raw root key into its sub-keys; the raw key is dropped (zeroized) here.
    pub fn from_secret(raw: SecretKey) -> Self {
        let wrap = derive_key(&raw, b"chatvault/root/wrap-key-store-key/v1");
        let control = derive_key(&raw, b"chatvault/root/control-plane/v1");
        let check_key = derive_key(&raw, b"chatvault/root/key-check-value/v1");
        let mut check = [0u8; 16];
        check.copy_from_slice(&check_key.expose()[..16]);
        RootKey { wrap, control, check }
    }

    /// Publishable fingerprint: tells a wrong root key from the right one without revealing it.
    pub fn check_value(&self) -> [u8; 16] {
        self.check
    }

    pub(crate) fn wrapping_key(&self) -> &SecretKey {
        &self.wrap
    }

    /// A key for one control-plane purpose (tenant registry sealing, audit chain MAC).
    /// Derived, not stored: it needs no rotation because it protects no personal data.
    pub(crate) fn control_key(&self, purpose: &[u8]) -> SecretKey {
        derive_key(&self.control, purpose)
    }
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey").finish_non_exhaustive()
    }
}

/// Outcome of loading: the key, and whether a development key was just generated.
pub struct LoadedRoot {
    pub key: RootKey,
    pub generated_dev_key: Option<PathBuf>,
}

/// Loads the root key. `salt` is the key directory's stored passphrase salt, if any;
/// for a passphrase with no stored salt a new one is returned in `new_salt`.
pub fn load(
    source: &RootKeySource,
    salt: Option<PassphraseSalt>,
    new_salt: &mut Option<PassphraseSalt>,
) -> Result<LoadedRoot, KeyError> {
    let mut generated = None;
    let raw = match source {
        RootKeySource::File(path) => read_key_file(path)?,
        RootKeySource::Hex(hex) => parse_key_text(hex.as_bytes(), "CHATVAULT_ROOT_KEY")?,
        RootKeySource::Passphrase(pass) => stretch(pass.as_bytes(), salt, new_salt)?,
        RootKeySource::PassphraseFile(path) => {
            let text = read_secret_file(path)?;
            let line = text.strip_suffix(b"\n").unwrap_or(&text);
            stretch(line.strip_suffix(b"\r").unwrap_or(line), salt, new_salt)?
        }
        RootKeySource::Development(path) => {
            if create_dev_secret(path)? {
                generated = Some(path.clone());
            }
            read_key_file(path)?
        }
    };
    Ok(LoadedRoot { key: RootKey::from_secret(raw), generated_dev_key: generated })
}

/// Writes 32 random bytes as hex to `path` (mode 0600) unless it exists; returns
/// whether it did. For development secrets only: they sit next to what they protect.
pub fn create_dev_secret(path: &Path) -> Result<bool, KeyError> {
    if path.exists() {
        return Ok(false);
    }
    let key = SecretKey::generate()?;
    let hex = Zeroizing::new(hex::encode(key.expose()));
    if let Some(dir) = path.parent() {
        files::ensure_private_dir(dir).map_err(|e| KeyError::io(dir, e))?;
    }
    files::write_atomic(path, hex.as_bytes()).map_err(|e| KeyError::io(path, e))?;
    Ok(true)
}

/// Derives the root key from a passphrase with argon2id, under the stored salt or a new one.
fn stretch(
    pass: &[u8],
    salt: Option<PassphraseSalt>,
    new_salt: &mut Option<PassphraseSalt>,
) -> Result<SecretKey, KeyError> {
    if pass.len() < 12 {
        return Err(KeyError::BadRootKey("passphrase must be at least 12 characters".into()));
    }
    let salt = match salt {
        Some(s) => s,
        None => {
            let s = PassphraseSalt { salt: crate::crypto::random_bytes()?, params: Argon2Params::default() };
            *new_salt = Some(s);
            s
        }
    };
    Ok(key_from_passphrase(pass, &salt.salt, salt.params)?)
}

/// Reads a file holding a secret: refused if group or others may read it; the bytes are
/// zeroized when dropped.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if files::readable_by_others(path).map_err(|e| KeyError::io(path, e))? {
        return Err(KeyError::BadRootKey(format!("{} is readable by group or others; chmod 600 it", path.display())));
    }
    Ok(Zeroizing::new(fs::read(path).map_err(|e| KeyError::io(path, e))?))
}

fn read_key_file(path: &Path) -> Result<SecretKey, KeyError> {
    let bytes = read_secret_file(path)?;
    if bytes.len() == KEY_LEN {
        return Ok(SecretKey::from_slice(&bytes)?);
    }
    parse_key_text(&bytes, &path.display().to_string())
}

fn parse_key_text(text: &[u8], origin: &str) -> Result<SecretKey, KeyError> {
    let trimmed = text.trim_ascii();
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(trimmed, raw.as_mut())
        .map_err(|_| KeyError::BadRootKey(format!("{origin}: expected 32 raw bytes or 64 hexadecimal characters")))?;
    Ok(SecretKey::from_slice(raw.as_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_root_keys_parse_and_bad_ones_are_refused_without_echo() {
        let hex = Zeroizing::new("11".repeat(32));
        let mut s = None;
        assert!(load(&RootKeySource::Hex(hex), None, &mut s).is_ok());
        let bad = Zeroizing::new("zz-secret-zz".to_string());
        let err = load(&RootKeySource::Hex(bad), None, &mut s).err().unwrap().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn different_root_keys_have_different_check_values() {
        let a = RootKey::from_secret(SecretKey::from_slice(&[1; 32]).unwrap());
        let b = RootKey::from_secret(SecretKey::from_slice(&[2; 32]).unwrap());
        assert_ne!(a.check_value(), b.check_value());
    }

    #[test]
    fn world_readable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        fs::write(&path, "22".repeat(32)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut s = None;
        assert!(matches!(load(&RootKeySource::File(path.clone()), None, &mut s), Err(KeyError::BadRootKey(_))));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&RootKeySource::File(path), None, &mut s).is_ok());
    }

    #[test]
    fn passphrase_files_are_checked_like_key_files_and_lose_their_newline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        fs::write(&path, "correct horse battery staple\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let salt = Some(PassphraseSalt {
            salt: [3; 16],
            params: Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 },
        });
        let mut s = None;
        let from_file = |s: &mut Option<PassphraseSalt>| load(&RootKeySource::PassphraseFile(path.clone()), salt, s);
        assert!(matches!(from_file(&mut s), Err(KeyError::BadRootKey(_))));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let direct =
            load(&RootKeySource::Passphrase(Zeroizing::new("correct horse battery staple".into())), salt, &mut s);
        assert_eq!(from_file(&mut s).unwrap().key.check_value(), direct.unwrap().key.check_value());
    }
}

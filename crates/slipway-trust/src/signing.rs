//! The server's ed25519 signing key and artifact signatures.
//!
//! - The key is created on the server's first start in the data directory (`signing.key`,
//!   mode 0600 from the first byte: 32-byte seed, hex) and never leaves [`Signer`].
//! - A signature covers `slipway-artifact-v1`, the artifact's kind (`snapshot` or `release`),
//!   agent, content hash and the sha256 of the artifact file's bytes. It is kept beside the
//!   artifact as `<artifact>.sig` (JSON, [`ArtifactSignature`]), so a copied artifact can be
//!   verified offline with only the public key ([`PublicKeyInfo`], served at `GET /api/keys`).
//! - [`verify_artifact`] re-hashes the file and checks the signature; anything else (a flipped
//!   byte, a replaced or missing signature, a signature of another artifact or by another key)
//!   is a [`VerifyError`].

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "ed25519";
/// File name of the key in the data directory.
pub const KEY_FILE: &str = "signing.key";

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {action} signing key {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("signing key {path} is malformed: expected 64 hex characters")]
    Malformed { path: PathBuf },
}

/// The public half, as served and as saved for offline verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyInfo {
    pub algorithm: String,
    /// First 16 hex characters of sha256(public key).
    pub key_id: String,
    /// The 32-byte public key, hex.
    pub public_key: String,
}

impl PublicKeyInfo {
    /// # Errors
    /// Not an ed25519 public key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, VerifyError> {
        let bad = || VerifyError::BadKey;
        if self.algorithm != ALGORITHM {
            return Err(bad());
        }
        let bytes: [u8; 32] = hex::decode(&self.public_key)
            .map_err(|_| bad())?
            .try_into()
            .map_err(|_| bad())?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| bad())
    }
}

fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))[..16].to_string()
}

/// Holds the signing key.
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a 32-byte seed (tests; the server uses [`Signer::load_or_create`]).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// Loads the key at `path`, or creates it (mode 0600 from the first byte) when there is
    /// none. Returns whether it was created. A key file readable by others is tightened to 0600.
    ///
    /// # Errors
    /// The file cannot be read, written or is malformed.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        let io = |action, source| KeyError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        match fs::read_to_string(path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| KeyError::Malformed {
                        path: path.to_path_buf(),
                    })?;
                let mode = fs::metadata(path)
                    .map_err(|e| io("read", e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                        .map_err(|e| io("restrict", e))?;
                }
                Ok((Self::from_seed(seed), false))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let seed: [u8; 32] = rand::random();
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| io("create", e))?;
                file.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io("write", e))?;
                Ok((Self::from_seed(seed), true))
            }
            Err(e) => Err(io("read", e)),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public(&self) -> PublicKeyInfo {
        PublicKeyInfo {
            algorithm: ALGORITHM.into(),
            key_id: self.key_id.clone(),
            public_key: hex::encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// Signs an artifact whose file sha256 is already known.
    pub fn sign(
        &self,
        kind: &str,
        agent_id: &str,
        content_hash: &str,
        sha256: &str,
    ) -> ArtifactSignature {
        let msg = message(kind, agent_id, content_hash, sha256);
        ArtifactSignature {
            version: 1,
            algorithm: ALGORITHM.into(),
            key_id: self.key_id.clone(),
            kind: kind.into(),
            agent_id: agent_id.into(),
            content_hash: content_hash.into(),
            sha256: sha256.into(),
            signature: hex::encode(self.key.sign(&msg).to_bytes()),
        }
    }

    /// Hashes the artifact file, signs it and writes `<artifact>.sig` (temp name, then rename).
    ///
    /// # Errors
    /// The artifact cannot be read or the signature file cannot be written.
    pub fn sign_file(
        &self,
        kind: &str,
        agent_id: &str,
        content_hash: &str,
        artifact: &Path,
    ) -> io::Result<ArtifactSignature> {
        let sha = sha256_file(artifact)?;
        let sig = self.sign(kind, agent_id, content_hash, &sha);
        write_signature(artifact, &sig)?;
        Ok(sig)
    }

    /// Like [`Signer::sign_file`] unless the artifact already has a signature file: a stored
    /// artifact is signed once, when it is first written, and never re-signed.
    ///
    /// # Errors
    /// See [`Signer::sign_file`].
    pub fn sign_file_once(
        &self,
        kind: &str,
        agent_id: &str,
        content_hash: &str,
        artifact: &Path,
    ) -> io::Result<bool> {
        if signature_path(artifact).exists() {
            return Ok(false);
        }
        self.sign_file(kind, agent_id, content_hash, artifact)?;
        Ok(true)
    }
}

/// The signed bytes.
pub fn message(kind: &str, agent_id: &str, content_hash: &str, sha256: &str) -> Vec<u8> {
    format!("slipway-artifact-v1\nkind:{kind}\nagent:{agent_id}\ncontent:{content_hash}\nsha256:{sha256}\n").into_bytes()
}

/// A signature as stored beside its artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactSignature {
    pub version: u32,
    pub algorithm: String,
    pub key_id: String,
    /// `snapshot` or `release`.
    pub kind: String,
    pub agent_id: String,
    pub content_hash: String,
    /// sha256 of the artifact file's bytes, hex.
    pub sha256: String,
    /// ed25519 signature of [`message`], hex.
    pub signature: String,
}

/// `<artifact>.sig`.
pub fn signature_path(artifact: &Path) -> PathBuf {
    let mut s = artifact.as_os_str().to_os_string();
    s.push(".sig");
    PathBuf::from(s)
}

/// Writes `<artifact>.sig` atomically.
///
/// # Errors
/// An I/O error.
pub fn write_signature(artifact: &Path, sig: &ArtifactSignature) -> io::Result<()> {
    let path = signature_path(artifact);
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(sig).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)
}

/// Reads `<artifact>.sig`.
///
/// # Errors
/// [`VerifyError::Missing`] or [`VerifyError::Unreadable`].
pub fn read_signature(artifact: &Path) -> Result<ArtifactSignature, VerifyError> {
    let path = signature_path(artifact);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(VerifyError::Missing),
        Err(e) => return Err(VerifyError::Unreadable(e.to_string())),
    };
    serde_json::from_str(&text).map_err(|e| VerifyError::Unreadable(e.to_string()))
}

/// Lower-case hex sha256 of a file's bytes.
///
/// # Errors
/// An I/O error.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Why an artifact did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the artifact has no signature")]
    Missing,
    #[error("the artifact's signature cannot be read: {0}")]
    Unreadable(String),
    #[error("the artifact cannot be read: {0}")]
    Artifact(String),
    #[error("the public key is not a valid ed25519 key")]
    BadKey,
    #[error("the artifact was signed by key {signed_by}, not by this server's key {expected}")]
    WrongKey { signed_by: String, expected: String },
    #[error("the signature is for {field} {signed:?}, not {expected:?}")]
    OtherArtifact {
        field: &'static str,
        signed: String,
        expected: String,
    },
    #[error("the artifact's sha256 is {actual}, but {signed} was signed: its bytes changed")]
    HashMismatch { signed: String, actual: String },
    #[error("the signature does not verify with the public key: it was forged or altered")]
    BadSignature,
}

/// What the caller expects the artifact to be; `None` fields are taken from the signature.
#[derive(Debug, Clone, Default)]
pub struct Expected<'a> {
    pub kind: Option<&'a str>,
    pub agent_id: Option<&'a str>,
    pub content_hash: Option<&'a str>,
}

/// Verifies an artifact file against its `<artifact>.sig` and `key`.
///
/// # Errors
/// The first problem found (see [`VerifyError`]).
pub fn verify_artifact(
    key: &PublicKeyInfo,
    artifact: &Path,
    expected: &Expected<'_>,
) -> Result<ArtifactSignature, VerifyError> {
    let sig = read_signature(artifact)?;
    verify_with(key, artifact, &sig, expected)?;
    Ok(sig)
}

/// Verifies an artifact file against a given signature.
///
/// # Errors
/// The first problem found (see [`VerifyError`]).
pub fn verify_with(
    key: &PublicKeyInfo,
    artifact: &Path,
    sig: &ArtifactSignature,
    expected: &Expected<'_>,
) -> Result<(), VerifyError> {
    let vk = key.verifying_key()?;
    if sig.key_id != key.key_id || sig.algorithm != ALGORITHM {
        return Err(VerifyError::WrongKey {
            signed_by: sig.key_id.clone(),
            expected: key.key_id.clone(),
        });
    }
    for (field, want, got) in [
        ("kind", expected.kind, &sig.kind),
        ("agent", expected.agent_id, &sig.agent_id),
        ("content hash", expected.content_hash, &sig.content_hash),
    ] {
        if let Some(want) = want {
            if want != got {
                return Err(VerifyError::OtherArtifact {
                    field,
                    signed: got.clone(),
                    expected: want.to_string(),
                });
            }
        }
    }
    let actual = sha256_file(artifact).map_err(|e| VerifyError::Artifact(e.to_string()))?;
    if actual != sig.sha256 {
        return Err(VerifyError::HashMismatch {
            signed: sig.sha256.clone(),
            actual,
        });
    }
    let bytes: [u8; 64] = hex::decode(&sig.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(VerifyError::BadSignature)?;
    let msg = message(&sig.kind, &sig.agent_id, &sig.content_hash, &sig.sha256);
    vk.verify(&msg, &Signature::from_bytes(&bytes))
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_private_and_stable_and_signatures_catch_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join(KEY_FILE);
        let (signer, created) = Signer::load_or_create(&key_path).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, created) = Signer::load_or_create(&key_path).unwrap();
        assert!(!created);
        assert_eq!(again.public(), signer.public());

        let artifact = dir.path().join("a.tar.zst");
        fs::write(&artifact, b"hello artifact").unwrap();
        signer
            .sign_file("snapshot", "agt-a", "cafe", &artifact)
            .unwrap();
        let key = signer.public();
        let want = Expected {
            kind: Some("snapshot"),
            agent_id: Some("agt-a"),
            content_hash: Some("cafe"),
        };
        verify_artifact(&key, &artifact, &want).unwrap();
        assert!(!signer
            .sign_file_once("snapshot", "agt-a", "cafe", &artifact)
            .unwrap());

        // Another artifact's expectations.
        let other = Expected {
            content_hash: Some("beef"),
            ..Default::default()
        };
        assert!(matches!(
            verify_artifact(&key, &artifact, &other),
            Err(VerifyError::OtherArtifact { .. })
        ));
        // A flipped byte.
        fs::write(&artifact, b"hellp artifact").unwrap();
        assert!(matches!(
            verify_artifact(&key, &artifact, &want),
            Err(VerifyError::HashMismatch { .. })
        ));
        fs::write(&artifact, b"hello artifact").unwrap();
        // A replaced signature (right shape, wrong bytes), and one by another key.
        let mut sig = read_signature(&artifact).unwrap();
        sig.signature = hex::encode([1u8; 64]);
        write_signature(&artifact, &sig).unwrap();
        assert_eq!(
            verify_artifact(&key, &artifact, &want),
            Err(VerifyError::BadSignature)
        );
        let stranger = Signer::from_seed([9; 32]);
        stranger
            .sign_file("snapshot", "agt-a", "cafe", &artifact)
            .unwrap();
        assert!(matches!(
            verify_artifact(&key, &artifact, &want),
            Err(VerifyError::WrongKey { .. })
        ));
        fs::remove_file(signature_path(&artifact)).unwrap();
        assert_eq!(
            verify_artifact(&key, &artifact, &want),
            Err(VerifyError::Missing)
        );
    }
}

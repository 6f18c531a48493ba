//! Scoped, expiring tokens (issue 5): a second way in for agents that cannot carry a client
//! certificate. A token names an identity and the prefixes it may publish, consume and
//! administer; it grants at most what the ACL grants that identity. It is signed with
//! HMAC-SHA256 by one of the broker's token keys (`token-keys.toml`, reloaded like the
//! ACL), expires, can be renewed before it expires (same id, new expiry) and revoked by id
//! (revocations are fsync'd to `revoked-tokens.txt` and survive restarts).
//!
//! Format: `dmq1.<payload>.<signature>`, both base64url without padding; the payload is
//! the JSON of [`Claims`]; the signature covers `dmq1.<payload>`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::acl::Right;

const PREFIX: &str = "dmq1.";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Random, shared by a token and its renewals; what revocation names.
    pub id: String,
    /// The identity the token stands for.
    pub sub: String,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
    #[serde(default)]
    pub admin: Vec<String>,
    /// Issued and expiry times, ms since the Unix epoch.
    pub iat: u64,
    pub exp: u64,
    /// The key that signed it.
    pub kid: String,
}

impl Claims {
    /// Whether the token's scope covers `right` on `channel` (admin covers everything).
    pub fn allows(&self, right: Right, channel: &str) -> bool {
        crate::acl::grants(&self.publish, &self.consume, &self.admin, right, channel)
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify (unknown key {0:?} or altered token)")]
    BadSignature(String),
    #[error("the token expired at {0} ms since the epoch")]
    Expired(u64),
    #[error("the token {0} was revoked")]
    Revoked(String),
}

/// One signing key from the keys file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    /// base64url of at least 32 random bytes.
    secret: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// The token keys: the first signs, every one verifies (so a new key can be put first
/// while tokens signed by the old one stay valid until it is removed).
pub struct TokenKeys {
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("TokenKeys").field("ids", &ids).finish()
    }
}

impl TokenKeys {
    /// Reads the keys file.
    pub fn load(path: &Path) -> Result<TokenKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("could not read the token keys {}: {e}", path.display()))?;
        let file: KeysFile = toml::from_str(&text).map_err(|e| {
            format!(
                "the token keys file {} is invalid: {}",
                path.display(),
                e.message()
            )
        })?;
        if file.key.is_empty() {
            return Err(format!(
                "the token keys file {} holds no [[key]]",
                path.display()
            ));
        }
        let mut keys = Vec::new();
        for k in file.key {
            let secret = URL_SAFE_NO_PAD.decode(k.secret.trim()).map_err(|e| {
                format!(
                    "token key {:?} in {}: the secret is not base64url: {e}",
                    k.id,
                    path.display()
                )
            })?;
            if secret.len() < 32 {
                return Err(format!(
                    "token key {:?} in {}: the secret has {} bytes; at least 32 are needed",
                    k.id,
                    path.display(),
                    secret.len()
                ));
            }
            keys.push((k.id, hmac::Key::new(hmac::HMAC_SHA256, &secret)));
        }
        Ok(TokenKeys { keys })
    }

    /// Writes a keys file with one new random key unless `path` exists (mode 0600).
    pub fn create_if_missing(path: &Path) -> Result<(), String> {
        if path.exists() {
            return Ok(());
        }
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| "the system random generator failed".to_owned())?;
        let mut id = [0u8; 4];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| "the system random generator failed".to_owned())?;
        let text = format!(
            "# DirectMQ token signing keys. The first key signs new tokens; every key verifies.\n\
             # To rotate: put a new [[key]] first, reload (SIGHUP), and remove the old key once\n\
             # the tokens it signed have expired.\n\
             [[key]]\nid = \"k-{}\"\nsecret = \"{}\"\n",
            hex(&id),
            URL_SAFE_NO_PAD.encode(secret)
        );
        write_private(path, text.as_bytes())
            .map_err(|e| format!("could not write the token keys {}: {e}", path.display()))
    }

    /// Whether a key of this id is loaded (a token signed by a removed key stops working).
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|(id, _)| id == kid)
    }

    /// A token for `claims`, signed with the first key (whose id it records).
    pub fn sign(&self, mut claims: Claims) -> String {
        let (kid, key) = &self.keys[0];
        claims.kid = kid.clone();
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed = format!("{PREFIX}{payload}");
        let tag = hmac::sign(key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of a token whose signature verifies; expiry and revocation are the
    /// caller's to check (renewal and revocation look at expired tokens too).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("it does not start with dmq1."))?;
        let (payload, signature) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("no signature part"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("the signature is not base64url"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed("the payload is not base64url"))?;
        let claims: Claims = serde_json::from_slice(&bytes)
            .map_err(|_| TokenError::Malformed("the payload is not a token's claims"))?;
        let key = self
            .keys
            .iter()
            .find(|(id, _)| *id == claims.kid)
            .map(|(_, k)| k)
            .ok_or_else(|| TokenError::BadSignature(claims.kid.clone()))?;
        let signed = &token[..PREFIX.len() + payload.len()];
        hmac::verify(key, signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature(claims.kid.clone()))?;
        Ok(claims)
    }
}

/// The secret in `path` (32 random bytes, created with mode 0600 when missing).
pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, String> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => return Err(format!("{} holds fewer than 32 bytes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("could not read {}: {e}", path.display())),
    }
    let mut secret = [0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "the system random generator failed".to_owned())?;
    write_private(path, &secret).map_err(|e| format!("could not write {}: {e}", path.display()))?;
    Ok(secret.to_vec())
}

/// A fresh random token id.
pub fn new_id() -> Result<String, String> {
    let mut id = [0u8; 16];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| "the system random generator failed".to_owned())?;
    Ok(hex(&id))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Revoked token ids with their expiry, kept in a file rewritten atomically and fsync'd.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    ids: Mutex<HashMap<String, u64>>,
}

impl Revocations {
    /// Loads the file (missing means none). Lines are `<id> <expiry ms>`.
    pub fn load(path: &Path) -> Result<Revocations, String> {
        let mut ids = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let parsed = line
                        .split_once(' ')
                        .and_then(|(id, exp)| Some((id.to_owned(), exp.trim().parse().ok()?)));
                    let (id, exp) = parsed.ok_or_else(|| {
                        format!(
                            "{} line {}: expected \"<id> <expiry ms>\"",
                            path.display(),
                            n + 1
                        )
                    })?;
                    ids.insert(id, exp);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("could not read {}: {e}", path.display())),
        }
        Ok(Revocations {
            path: path.to_owned(),
            ids: Mutex::new(ids),
        })
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.ids.lock().expect("revocations lock").contains_key(id)
    }

    /// Revokes `id` (whose tokens expire at `exp`, `u64::MAX` when unknown) durably: the
    /// file is rewritten aside, fsync'd and renamed over, and the directory fsync'd.
    /// Entries whose tokens have expired are dropped from the file.
    pub fn revoke(&self, id: &str, exp: u64, now: u64) -> Result<(), String> {
        let mut ids = self.ids.lock().expect("revocations lock");
        let mut next = ids.clone();
        next.insert(id.to_owned(), exp);
        next.retain(|_, exp| *exp > now);
        let mut text = String::from("# Revoked DirectMQ tokens: <id> <expiry ms>\n");
        for (id, exp) in &next {
            text.push_str(&format!("{id} {exp}\n"));
        }
        let aside = self.path.with_extension("new");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&aside)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&aside, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("could not write {}: {e}", self.path.display()))?;
        // Expired entries stay in memory: a token that expired is refused anyway.
        ids.insert(id.to_owned(), exp);
        Ok(())
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            id: "abc".into(),
            sub: "agent".into(),
            publish: vec![],
            consume: vec!["dc-a/".into()],
            admin: vec![],
            iat: 1,
            exp: 2,
            kid: String::new(),
        }
    }

    #[test]
    fn a_signed_token_verifies_and_any_change_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        TokenKeys::create_if_missing(&path).unwrap();
        let keys = TokenKeys::load(&path).unwrap();
        let token = keys.sign(claims());
        let got = keys.verify(&token).unwrap();
        assert_eq!(got.sub, "agent");
        assert!(got.allows(Right::Consume, "dc-a/x"));
        assert!(!got.allows(Right::Publish, "dc-a/x"));
        assert!(!got.allows(Right::Consume, "dc-b/x"));
        // Flip each character of the token in turn: none verifies.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            if let Ok(altered) = String::from_utf8(bytes) {
                if altered != token {
                    assert!(keys.verify(&altered).is_err(), "position {i}");
                }
            }
        }
        // Another key does not verify it.
        let other = dir.path().join("other.toml");
        TokenKeys::create_if_missing(&other).unwrap();
        let other = TokenKeys::load(&other).unwrap();
        assert!(matches!(
            other.verify(&token),
            Err(TokenError::BadSignature(_))
        ));
    }

    #[test]
    fn short_or_missing_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "[[key]]\nid = \"k\"\nsecret = \"c2hvcnQ\"\n").unwrap();
        assert!(TokenKeys::load(&path).unwrap_err().contains("at least 32"));
        std::fs::write(&path, "").unwrap();
        assert!(TokenKeys::load(&path).unwrap_err().contains("no [[key]]"));
    }

    #[test]
    fn revocations_survive_a_reload_and_drop_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.txt");
        let r = Revocations::load(&path).unwrap();
        r.revoke("old", 5, 10).unwrap();
        r.revoke("live", 100, 10).unwrap();
        assert!(r.is_revoked("live") && r.is_revoked("old"));
        let again = Revocations::load(&path).unwrap();
        assert!(again.is_revoked("live"));
        assert!(!again.is_revoked("old"), "expired entries need not be kept");
    }
}

//! Certificates: the development CA the first `serve` creates, `directmq certs`, the
//! server's TLS configuration (client certificates required) and the identity of a peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use directmq_client::net;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("could not generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] directmq_client::Error),
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        op: "write",
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From an hour ago (allowing for clock skew) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = time::OffsetDateTime::now_utc();
        Validity {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }

    fn apply(self, params: &mut CertificateParams) {
        params.not_before = self.not_before;
        params.not_after = self.not_after;
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `ca.pem` and `ca.key` into `dir`.
pub fn create_ca(dir: &Path, common_name: &str, days: u32) -> Result<(), TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Validity::days(days).apply(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.pem"), &cert.pem(), false)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    Ok(())
}

fn load_ca(ca_dir: &Path) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let params = CertificateParams::from_ca_cert_pem(&read(&ca_dir.join("ca.pem"))?)?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// Writes `<stem>.pem` and `<stem>.key` into `out`, signed by the CA in `ca_dir`.
fn issue(
    ca_dir: &Path,
    out: &Path,
    stem: &str,
    common_name: &str,
    alt_names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    valid: Validity,
) -> Result<(), TlsError> {
    let (ca, ca_key) = load_ca(ca_dir)?;
    let mut params = CertificateParams::new(alt_names)?;
    params.distinguished_name = name(common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    valid.apply(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write(&out.join(format!("{stem}.pem")), &cert.pem(), false)?;
    write(&out.join(format!("{stem}.key")), &key.serialize_pem(), true)?;
    Ok(())
}

/// A server certificate for `names` (DNS names or IP addresses).
pub fn issue_server(
    ca_dir: &Path,
    out: &Path,
    names: &[String],
    days: u32,
) -> Result<(), TlsError> {
    let cn = names.first().cloned().unwrap_or_else(|| "localhost".into());
    issue(
        ca_dir,
        out,
        "server",
        &cn,
        names.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
        Validity::days(days),
    )
}

/// A client certificate whose common name is the identity; `out` also gets a copy of
/// `ca.pem`, so it works as a client's `--certs` folder.
pub fn issue_client(ca_dir: &Path, out: &Path, identity: &str, days: u32) -> Result<(), TlsError> {
    issue_client_valid(ca_dir, out, identity, Validity::days(days))
}

/// [`issue_client`] with an explicit validity period.
pub fn issue_client_valid(
    ca_dir: &Path,
    out: &Path,
    identity: &str,
    valid: Validity,
) -> Result<(), TlsError> {
    issue(
        ca_dir,
        out,
        "client",
        identity,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        valid,
    )?;
    if ca_dir != out {
        write(&out.join("ca.pem"), &read(&ca_dir.join("ca.pem"))?, false)?;
    }
    Ok(())
}

/// Creates the development CA, a server certificate and an `admin` client certificate in
/// `dir` unless `ca.pem` is already there. Returns whether it created them.
pub fn ensure_dev_certs(dir: &Path, extra_names: &[String]) -> Result<bool, TlsError> {
    if dir.join("ca.pem").exists() {
        return Ok(false);
    }
    create_ca(dir, "DirectMQ development CA", 3650)?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(extra_names.iter().cloned());
    issue_server(dir, dir, &names, 825)?;
    issue_client(dir, dir, "admin", 825)?;
    Ok(true)
}

/// The server's QUIC configuration: TLS 1.3, ALPN `directmq/2`, client certificates
/// chained to one of `ca_files` required.
pub fn server_config(
    ca_files: &[PathBuf],
    cert: &Path,
    key: &Path,
    options: &net::NetOptions,
    allow_tokens: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for file in ca_files {
        for ca in net::load_certs(file)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Config(format!("CA {}: {e}", file.display())))?;
        }
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        net::provider(),
    );
    // With tokens allowed, a client may come without a certificate and must then present a
    // token in its Hello; a certificate it does present is still verified.
    let builder = if allow_tokens {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(net::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(net::load_certs(cert)?, net::load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // The current protocol first: rustls picks the server's first that the client offers.
    tls.alpn_protocols = std::iter::once(directmq_protocol::ALPN)
        .chain(directmq_protocol::OLDER_ALPNS.iter().copied())
        .map(<[u8]>::to_vec)
        .collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(options.transport());
    config.max_incoming(options.max_handshakes as usize);
    Ok(config)
}

/// The identity of a connection: the common name of its client certificate.
pub fn peer_identity(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

//! Rotation without restart (SPEC §3): the server certificate and key, the CA set, the ACL
//! and the token signing keys are reloaded on SIGHUP and when their files change. New connections use the new TLS
//! material at once; rights are read at every operation, so a removed right applies to open
//! connections at their next operation. A file that does not load leaves the old material
//! in force, with one clear log line.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::acl::Acl;
use crate::server::Broker;
use crate::tls;
use crate::tokens::TokenKeys;

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The ACL was read and is in force (it may be unchanged).
    pub acl: Result<(), String>,
    /// The certificate, key and CA files were read and new connections use them.
    pub tls: Result<(), String>,
    /// The token keys were read and verify and sign from now on.
    pub token_keys: Result<(), String>,
}

impl ReloadReport {
    pub fn is_ok(&self) -> bool {
        self.acl.is_ok() && self.tls.is_ok() && self.token_keys.is_ok()
    }
}

impl Broker {
    /// The files a reload reads.
    pub fn reloadable_files(&self) -> Vec<PathBuf> {
        let config = self.config();
        let mut files = vec![config.acl_path(), config.cert_path(), config.key_path()];
        files.extend(config.ca_files());
        files.push(config.token_keys_path());
        files
    }

    /// Reads the ACL and the TLS files again and puts what loads into force.
    pub fn reload(&self) -> ReloadReport {
        let config = self.config();
        let acl = match Acl::load(&config.acl_path()) {
            Ok(acl) => {
                let mut current = self.acl.write().expect("acl lock");
                if **current != acl {
                    *current = Arc::new(acl);
                    info!(path = %config.acl_path().display(), "ACL reloaded");
                }
                Ok(())
            }
            Err(e) => {
                error!("{e}; the previous ACL stays in force");
                Err(e)
            }
        };
        let tls = match tls::server_config(
            &config.ca_files(),
            &config.cert_path(),
            &config.key_path(),
            &self.net_options(),
            config.allow_tokens,
        ) {
            Ok(server_config) => {
                let endpoint = self.endpoint.lock().expect("endpoint lock");
                match endpoint.as_ref() {
                    // After shutdown began the endpoint accepts nothing; keep it that way.
                    Some(endpoint) if !self.is_shutting_down() => {
                        endpoint.set_server_config(Some(server_config));
                        info!("server certificate, key and CA set reloaded for new connections");
                    }
                    _ => {}
                }
                Ok(())
            }
            Err(e) => {
                let message = format!(
                    "could not reload the server certificate, key or CA files: {e}; the previous ones stay in force"
                );
                error!("{message}");
                Err(message)
            }
        };
        let token_keys = match TokenKeys::load(&config.token_keys_path()) {
            Ok(keys) => {
                *self.token_keys.write().expect("token keys lock") = Arc::new(keys);
                Ok(())
            }
            Err(e) => {
                error!("{e}; the previous token keys stay in force");
                Err(e)
            }
        };
        ReloadReport {
            acl,
            tls,
            token_keys,
        }
    }

    /// Reloads whenever one of the files changes, checked every `reload_interval_ms`.
    pub(crate) async fn reload_loop(self: Arc<Self>) {
        let interval = self.config().reload_interval_ms;
        if interval == 0 {
            return;
        }
        let mut seen = fingerprints(&self.reloadable_files());
        // A change is loaded once the files read the same on two checks in a row, so a
        // file caught half-written by an editor is not put into force.
        let mut changed: Option<Vec<Option<u32>>> = None;
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(interval)) => {}
                _ = shutdown.changed() => return,
            }
            let files = self.reloadable_files();
            let now = fingerprints(&files);
            if now == seen {
                changed = None;
                continue;
            }
            if changed.as_ref() != Some(&now) {
                changed = Some(now);
                continue;
            }
            changed = None;
            info!("a certificate, key, CA or ACL file changed; reloading");
            let broker = self.clone();
            let _ = tokio::task::spawn_blocking(move || broker.reload()).await;
            // Also when the reload failed: the next change (the fix) reloads again.
            seen = now;
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// A checksum of each file's contents (`None` when unreadable): contents, not modification
/// times, so a quick rewrite within one timestamp tick is still seen.
fn fingerprints(files: &[PathBuf]) -> Vec<Option<u32>> {
    files
        .iter()
        .map(|f| std::fs::read(f).ok().map(|b| crc32c::crc32c(&b)))
        .collect()
}

//! One connection to a registry for one reference: the parsed reference, the protocol
//! (HTTPS, or plain HTTP for loopback and `--plain-http`), credentials, and a runtime to drive
//! the async client from this synchronous program.

use super::{auth, Options};
use crate::error::{Error, Result};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

pub struct Registry {
    pub client: Client,
    pub reference: Reference,
    pub auth: RegistryAuth,
    /// The reference as the user wrote it, for messages.
    pub label: String,
    pub rt: tokio::runtime::Runtime,
}

/// Whether `registry` (host[:port]) is this machine.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Registry {
    pub fn open(reference: &str, opts: &Options) -> Result<Registry> {
        let r: Reference = reference
            .parse()
            .map_err(|e| Error::Invalid(format!("{reference:?} is not an image reference: {e}")))?;
        let host = r.resolve_registry().to_string();
        let protocol = if opts.plain_http || is_loopback(&host) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the registry client", e))?;
        Ok(Registry {
            client: Client::new(config),
            auth: auth::for_registry(&host)?,
            reference: r,
            label: reference.to_string(),
            rt,
        })
    }

    /// An error of the registry client as ours, naming the reference and what was being done.
    pub fn error(&self, doing: &str, e: OciDistributionError) -> Error {
        let text = format!("{}: {doing}: {}", self.label, describe(&e));
        match &e {
            OciDistributionError::ImageManifestNotFoundError(_) => Error::NotFound(text),
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|x| {
                    matches!(
                        x.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                    )
                }) =>
            {
                Error::NotFound(text)
            }
            _ if text.contains("404") => Error::NotFound(text),
            _ => Error::Invalid(text),
        }
    }
}

/// The client's error with its causes (a connection refused is three levels down).
fn describe(e: &OciDistributionError) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_registries_get_plain_http_unasked() {
        for h in [
            "127.0.0.1:5000",
            "localhost:80",
            "[::1]:5000",
            "localhost",
            "127.0.0.2",
        ] {
            assert!(super::is_loopback(h), "{h}");
        }
        for h in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "docker.io",
            "localhost.evil",
        ] {
            assert!(!super::is_loopback(h), "{h}");
        }
    }
}

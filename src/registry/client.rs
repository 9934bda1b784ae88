//! One connection to a registry for one reference: the parsed reference, the protocol
//! (HTTPS, or plain HTTP for loopback and `--plain-http`), credentials, and a runtime to drive
//! the async client from this synchronous program.

use super::{auth, Options};
use crate::error::{Error, Kind, Result};
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
    /// Spoken over plain HTTP (a loopback registry, or `--plain-http`), not HTTPS.
    pub plain_http: bool,
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
        let r: Reference = reference.parse().map_err(|e| {
            Error::InvalidInput(format!("{reference:?} is not an image reference: {e}"))
        })?;
        let host = r.resolve_registry().to_string();
        let plain_http = opts.plain_http || is_loopback(&host);
        let protocol = if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            // Every blob's length is known before it is sent (`content.size`): one PUT each.
            use_monolithic_push: true,
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the registry client", e))?;
        let client = Client::new(config);
        let auth = auth::for_registry(&host)?;
        // Kept by the client for requests that take no credentials (ranged blob reads of a
        // lazily pulled layer, which may come long after the manifest): with them it asks for
        // a new bearer token when the one it has expires.
        rt.block_on(client.store_auth_if_needed(&host, &auth));
        Ok(Registry {
            client,
            auth,
            reference: r,
            label: reference.to_string(),
            plain_http,
            rt,
        })
    }

    /// `host[:port]/repository`, as a layer's sources name it (`stream::source`).
    pub fn location(&self) -> String {
        format!(
            "{}/{}",
            self.reference.resolve_registry(),
            self.reference.repository()
        )
    }

    /// An error of the registry client as ours, naming the reference and what was being done.
    pub fn error(&self, doing: &str, e: OciDistributionError) -> Error {
        let text = format!("{}: {doing}: {}", self.label, describe(&e));
        Error::new(kind_of(&e), text)
    }
}

/// The kind of a registry client's error, from its variant, the registry's error codes and
/// the HTTP status: never from its text.
fn kind_of(e: &OciDistributionError) -> Kind {
    use oci_client::errors::OciErrorCode as C;
    use OciDistributionError as E;
    match e {
        E::ImageManifestNotFoundError(_) => Kind::NotFound,
        E::RegistryError { envelope, .. } => {
            let codes = || envelope.errors.iter().map(|x| &x.code);
            if codes().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::BlobUnknown | C::NameUnknown | C::NotFound
                )
            }) {
                Kind::NotFound
            } else if codes().any(|c| matches!(c, C::Toomanyrequests)) {
                Kind::Unavailable
            } else {
                Kind::InvalidInput
            }
        }
        E::ServerError { code, .. } => http_kind(*code),
        E::RequestError(r) => match r.status() {
            Some(s) => http_kind(s.as_u16()),
            // Not connected, timed out, cut off: the registry is not answering.
            None => Kind::Unavailable,
        },
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => Kind::InvalidInput,
        E::UrlParseError(_)
        | E::ImageIndexParsingNoPlatformResolverError
        | E::IncompatibleLayerMediaTypeError(_)
        | E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_) => Kind::InvalidInput,
        E::DigestError(_)
        | E::JsonError(_)
        | E::ManifestEncodingError(_)
        | E::ManifestParsingError(_)
        | E::VersionedParsingError(_)
        | E::SpecViolationError(_)
        | E::RegistryNoDigestError
        | E::RegistryNoLocationError
        | E::RegistryTokenDecodeError(_)
        | E::HeaderValueError(_) => Kind::Corrupt,
        E::IoError(_) => Kind::Io,
        _ => Kind::Internal,
    }
}

/// The kind of an HTTP status the registry answered with.
fn http_kind(status: u16) -> Kind {
    match status {
        404 => Kind::NotFound,
        408 | 429 | 500..=599 => Kind::Unavailable,
        400..=499 => Kind::InvalidInput,
        _ => Kind::Internal,
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

    #[test]
    fn registry_errors_get_their_kind_from_the_status_not_the_text() {
        use super::{kind_of, Kind};
        use oci_client::errors::OciDistributionError as E;
        let server = |code: u16, message: &str| E::ServerError {
            code,
            url: "http://r/v2/a/manifests/1".into(),
            message: message.into(),
        };
        assert_eq!(kind_of(&server(404, "gone")), Kind::NotFound);
        // A 500 whose text happens to say 404 is still the registry failing.
        assert_eq!(
            kind_of(&server(500, "upstream said 404")),
            Kind::Unavailable
        );
        assert_eq!(kind_of(&server(400, "bad")), Kind::InvalidInput);
        assert_eq!(
            kind_of(&E::ImageManifestNotFoundError("a:1".into())),
            Kind::NotFound
        );
        assert_eq!(
            kind_of(&E::ManifestParsingError("404".into())),
            Kind::Corrupt
        );
    }
}

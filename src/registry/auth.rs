//! Credentials from the docker config file, as docker and skopeo read it:
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, its `auths` keyed by registry
//! host (also written `https://host`, `http://host` or `https://host/v1/`). `auth` (base64
//! `user:password`) gives basic credentials, which the client also trades for a bearer token
//! when the registry asks for one; `registrytoken` is a bearer token used as it is.
//! Credential helpers (`credsStore`, `credHelpers`) are not run.

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

fn config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials for `registry` (host[:port]); anonymous when none are configured. A file
/// that exists but does not parse is an error naming it.
pub fn for_registry(registry: &str) -> crate::Result<RegistryAuth> {
    let Some(path) = config_path() else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(crate::Error::io(format!("reading {}", path.display()), e)),
    };
    let config: Config = serde_json::from_str(&text).map_err(|e| {
        crate::Error::InvalidInput(format!("{}: not a docker config file: {e}", path.display()))
    })?;
    from_config(&config, registry)
        .map_err(|e| crate::Error::InvalidInput(format!("{}: {e}", path.display())))
}

fn from_config(config: &Config, registry: &str) -> Result<RegistryAuth, String> {
    let keys = [
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
    ];
    let Some(e) = keys.iter().find_map(|k| config.auths.get(k)) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(t) = &e.registrytoken {
        return Ok(RegistryAuth::Bearer(t.clone()));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(a) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| format!("the auth entry for {registry} is not base64"))?;
        let s = String::from_utf8(raw)
            .map_err(|_| format!("the auth entry for {registry} is not UTF-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| format!("the auth entry for {registry} is not user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, reg: &str) -> RegistryAuth {
        from_config(&serde_json::from_str(json).unwrap(), reg).unwrap()
    }

    #[test]
    fn basic_and_bearer_credentials_are_found_under_any_spelling_of_the_host() {
        // "alice:s3cret"
        let j = r#"{"auths": {"https://reg.example:5000": {"auth": "YWxpY2U6czNjcmV0"},
                               "tok.example": {"registrytoken": "T0K"}}}"#;
        match parse(j, "reg.example:5000") {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cret")),
            a => panic!("{a:?}"),
        }
        assert!(matches!(parse(j, "tok.example"), RegistryAuth::Bearer(t) if t == "T0K"));
        assert!(matches!(parse(j, "other"), RegistryAuth::Anonymous));
        let bad = serde_json::from_str(r#"{"auths": {"x": {"auth": "bm9jb2xvbg=="}}}"#).unwrap();
        assert!(from_config(&bad, "x")
            .unwrap_err()
            .contains("user:password"));
    }
}

//! Layer names: what the CLI and NBD export names accept.

use crate::error::{Error, Result};
use crate::format::MAX_NAME_LEN;

pub fn validate(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidInput("layer name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidInput(format!(
            "layer name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::InvalidInput(format!(
            "layer name {name:?} contains the control character {c:?}"
        )));
    }
    if name.trim() != name {
        return Err(Error::InvalidInput(format!(
            "layer name {name:?} starts or ends with white space"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_image_references_and_rejects_junk() {
        assert!(validate("acme/my-base-image:1.0").is_ok());
        assert!(validate("registry.example.com:5000/a/b@sha256:abc").is_ok());
        assert!(validate("").is_err());
        assert!(validate("a\nb").is_err());
        assert!(validate(&"x".repeat(256)).is_err());
        assert!(validate(&"x".repeat(255)).is_ok());
        assert!(validate(" web").is_err());
    }
}

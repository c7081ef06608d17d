//! What every daemon's configuration shares: reading a TOML file, errors
//! that name the offending field, and credentials kept in files.

use std::path::{Path, PathBuf};

/// A configuration problem, naming the field or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot read {what} {path}")]
    File {
        /// What the file holds: `the TLS CA`.
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read token file {path} ({what})")]
    TokenFile {
        /// Whose token: `tenant \`blue\``, `the cluster token`.
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An `Invalid` error for `field`.
pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Reads a TOML file into `T` (whose serde attributes reject unknown
/// fields).
pub fn from_toml_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads a credential from a file; trailing whitespace (a final newline)
/// is not part of it.
pub fn read_token(what: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .map_err(|source| ConfigError::TokenFile {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct C {
        #[allow(dead_code)]
        a: u32,
    }

    #[test]
    fn files_tokens_and_errors() {
        let dir = std::env::temp_dir().join(format!("rmem-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "a = 1\n").unwrap();
        assert!(from_toml_file::<C>(&f).is_ok());
        std::fs::write(&f, "b = 1\n").unwrap();
        let e = from_toml_file::<C>(&f).unwrap_err().to_string();
        assert!(e.contains("unknown field `b`"), "{e}");
        std::fs::write(&f, "secret\n\n").unwrap();
        assert_eq!(read_token("the cluster token", &f).unwrap(), "secret");
        let e = read_token("tenant `x`", &dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("tenant `x`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

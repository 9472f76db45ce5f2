//! Where the node keeps its data and how the CLI finds the server and its token.
//!
//! Owns the default data dir, the client config file (`client.toml`, mode 0600) and the
//! precedence flags > environment > config file. It must not talk to the server.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const CLIENT_CONFIG: &str = "client.toml";
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// `$XDG_DATA_HOME/telvirt`, else `~/.local/share/telvirt`.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("telvirt"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/telvirt"))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub server: String,
    pub token: String,
}

impl ClientConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read client config {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("client config {} is invalid", path.display()))
    }

    /// Writes the file with mode 0600 through a temporary file and a rename, so a reader never
    /// sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_private(path, toml::to_string(self)?.as_bytes())
    }
}

/// Writes a secret (a token, a config holding one) readable by its owner only (0600), whole or
/// not at all.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(telvirt_files::write_private(path, bytes)?)
}

/// Server and token for a CLI call: flags and environment first, then the config file.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    config: Option<PathBuf>,
) -> Result<ClientConfig> {
    if let (Some(server), Some(token)) = (&server, &token) {
        return Ok(ClientConfig {
            server: server.clone(),
            token: token.clone(),
        });
    }
    let path = match config {
        Some(p) => p,
        None => default_data_dir()?.join(CLIENT_CONFIG),
    };
    let file = if path.exists() {
        Some(ClientConfig::read(&path)?)
    } else {
        None
    };
    let token = match (token, &file) {
        (Some(t), _) => t,
        (None, Some(f)) => f.token.clone(),
        (None, None) => bail!(
            "no token: pass --token, set TELVIRT_TOKEN, or point --config/TELVIRT_CONFIG at a client.toml \
             (looked for {})",
            path.display()
        ),
    };
    let server = server
        .or_else(|| file.map(|f| f.server))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    Ok(ClientConfig { server, token })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn config_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLIENT_CONFIG);
        let config = ClientConfig {
            server: "http://127.0.0.1:1".into(),
            token: "tvt_x".into(),
        };
        config.write(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClientConfig::read(&path).unwrap(), config);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLIENT_CONFIG);
        ClientConfig {
            server: "http://file".into(),
            token: "file-token".into(),
        }
        .write(&path)
        .unwrap();
        let got = resolve(None, Some("flag-token".into()), Some(path.clone())).unwrap();
        assert_eq!(got.token, "flag-token");
        assert_eq!(got.server, "http://file");
        let got = resolve(Some("http://flag".into()), None, Some(path)).unwrap();
        assert_eq!(got.server, "http://flag");
        assert_eq!(got.token, "file-token");
    }

    #[test]
    fn missing_token_says_where_it_looked() {
        let err = resolve(None, None, Some("/nonexistent/client.toml".into())).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/client.toml"),
            "{err}"
        );
    }
}

//! Where the node keeps its data and how the CLI finds the server and its token.
//!
//! Owns the default data dir, the client config file (`client.toml`, mode 0600) and the
//! precedence flags > environment > config file. It must not talk to the server.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const CLIENT_CONFIG: &str = "client.toml";
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7070";

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
    /// PEM certificate(s) the API's certificate must chain to: the server's own certificate
    /// (pinned) or its CA. Absent: the system's trusted roots (or a `--plain-http` server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
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

    /// An HTTP client that reaches this API (trusting its `ca`).
    pub fn http(&self) -> Result<reqwest::ClientBuilder> {
        crate::tls::http_client(self.ca.as_deref())
    }
}

/// Writes a secret (a token, a config holding one) readable by its owner only (0600), whole or
/// not at all.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(telvirt_files::write_private(path, bytes)?)
}

/// What the CLI's flags and environment say about reaching the API.
#[derive(Debug, Clone, Default)]
pub struct ClientFlags {
    pub server: Option<String>,
    pub token: Option<String>,
    pub config: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// Server, token and trust anchor for a CLI call: flags and environment first, then the config
/// file.
pub fn resolve(flags: &ClientFlags) -> Result<ClientConfig> {
    let ca_file = flags
        .ca_file
        .as_ref()
        .map(|p| {
            fs::read_to_string(p).with_context(|| format!("--ca-file: cannot read {}", p.display()))
        })
        .transpose()?;
    if let (Some(server), Some(token)) = (&flags.server, &flags.token) {
        return Ok(ClientConfig {
            server: server.clone(),
            token: token.clone(),
            ca: ca_file,
        });
    }
    let path = match &flags.config {
        Some(p) => p.clone(),
        None => default_data_dir()?.join(CLIENT_CONFIG),
    };
    let file = if path.exists() {
        Some(ClientConfig::read(&path)?)
    } else {
        None
    };
    let token = match (&flags.token, &file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => f.token.clone(),
        (None, None) => bail!(
            "no token: pass --token, set TELVIRT_TOKEN, or point --config/TELVIRT_CONFIG at a client.toml \
             (looked for {})",
            path.display()
        ),
    };
    let ca = ca_file.or_else(|| file.as_ref().and_then(|f| f.ca.clone()));
    let server = flags
        .server
        .clone()
        .or_else(|| file.map(|f| f.server))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    Ok(ClientConfig { server, token, ca })
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
            server: "https://127.0.0.1:1".into(),
            token: "tvt_x".into(),
            ca: Some("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into()),
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
            ca: Some("file-ca".into()),
        }
        .write(&path)
        .unwrap();
        let flags =
            |server: Option<&str>, token: Option<&str>, ca_file: Option<PathBuf>| ClientFlags {
                server: server.map(Into::into),
                token: token.map(Into::into),
                config: Some(path.clone()),
                ca_file,
            };
        let got = resolve(&flags(None, Some("flag-token"), None)).unwrap();
        assert_eq!(got.token, "flag-token");
        assert_eq!(got.server, "http://file");
        assert_eq!(got.ca.as_deref(), Some("file-ca"));
        let got = resolve(&flags(Some("http://flag"), None, None)).unwrap();
        assert_eq!(got.server, "http://flag");
        assert_eq!(got.token, "file-token");
        let ca = dir.path().join("ca.pem");
        fs::write(&ca, "flag-ca").unwrap();
        let got = resolve(&flags(None, None, Some(ca.clone()))).unwrap();
        assert_eq!(got.ca.as_deref(), Some("flag-ca"));
        // Server and token both given: the file is not read, the CA comes from the flag only.
        let got = resolve(&flags(Some("https://flag"), Some("t"), None)).unwrap();
        assert_eq!(got.ca, None);
        let err = resolve(&flags(None, None, Some(dir.path().join("none.pem")))).unwrap_err();
        assert!(err.to_string().contains("--ca-file"), "{err}");
    }

    #[test]
    fn missing_token_says_where_it_looked() {
        let err = resolve(&ClientFlags {
            config: Some("/nonexistent/client.toml".into()),
            ..ClientFlags::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/client.toml"),
            "{err}"
        );
    }
}

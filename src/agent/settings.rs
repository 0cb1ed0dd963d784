//! Where the agent finds its settings, each from the first place that has
//! it: flag, environment, manifest, default. The API and download URLs, the
//! bearer token, and the facts this node reports about itself.

use super::client::Client;
use super::host;
use super::manifest::{Manifest, DEFAULT_PATH};
use crate::cli::{Args, Env};
use crate::error::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// The API base when nothing else names one.
pub const DEFAULT_API: &str = "http://127.0.0.1:8081/api/v1";

/// The manifest path: `--config`, else `BIN_PROXY_CONFIG`, else the default.
pub fn config_path(args: &Args, env: Env) -> PathBuf {
    args.config
        .clone()
        .or_else(|| env("BIN_PROXY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// Builds the client from flag > env > manifest > default.
pub fn client_for(
    args: &Args,
    env: Env,
    manifest: &Manifest,
    config: &Path,
    facts: &NodeFacts,
) -> Result<Client> {
    let api = args
        .api
        .clone()
        .or_else(|| env("BIN_MANAGER_API"))
        .or_else(|| manifest.manager.api.clone());
    let api = api
        .unwrap_or_else(|| DEFAULT_API.to_string())
        .trim_end_matches('/')
        .to_string();
    let download = args
        .download_url
        .clone()
        .or_else(|| env("BIN_DOWNLOAD_URL"))
        .or_else(|| manifest.manager.download_url.clone());
    let download_base = download
        .unwrap_or_else(|| format!("{api}/download"))
        .trim_end_matches('/')
        .to_string();
    for (what, url) in [("API", &api), ("download", &download_base)] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Usage(format!(
                "the {what} URL must start with http:// or https://, not \"{url}\""
            )));
        }
    }
    let token = match (env("BIN_MANAGER_TOKEN"), &manifest.manager.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(file)) => {
            let t = fs::read_to_string(file).map_err(|e| Error::Config {
                path: config.to_path_buf(),
                msg: format!(
                    "manager.tokenFile \"{}\" cannot be read: {e}",
                    file.display()
                ),
            })?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        (None, None) => None,
    };
    Ok(Client {
        api,
        download_base,
        token,
        timeout: args.timeout,
        download_timeout: args.download_timeout,
        arch: facts.cpu_arch.clone(),
        node: facts.name.clone(),
        node_token: None, // from the state file, once it is loaded
    })
}

/// What this node says about itself in every registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name (the manifest's, else the hostname).
    pub name: String,
    /// cpuArch (the manifest's, else `uname -m`).
    pub cpu_arch: String,
    /// osRelease (the manifest's, else `/etc/os-release` PRETTY_NAME).
    pub os_release: String,
}

/// The node facts to report: the manifest's, with empty ones detected.
pub fn node_facts(manifest: &Manifest) -> NodeFacts {
    let pick = |v: &Option<String>, detect: fn() -> String| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map_or_else(detect, str::to_string)
    };
    NodeFacts {
        name: pick(&manifest.node.name, host::hostname),
        cpu_arch: pick(&manifest.node.cpu_arch, host::cpu_arch),
        os_release: pick(&manifest.node.os_release, host::os_release),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            name: "web-01".into(),
            cpu_arch: "x86_64".into(),
            os_release: "Debian".into(),
        }
    }

    #[test]
    fn precedence_flag_env_manifest_default() {
        let mut m = Manifest::default();
        let cfg = Path::new("/m.json");
        let none = env_of(&[]);
        let c = client_for(&Args::default(), &none, &m, cfg, &facts()).unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str()),
            (DEFAULT_API, "http://127.0.0.1:8081/api/v1/download")
        );
        m.manager.api = Some("http://manifest/api/v1/".into());
        let c = client_for(&Args::default(), &none, &m, cfg, &facts()).unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str()),
            ("http://manifest/api/v1", "http://manifest/api/v1/download")
        );
        let env = env_of(&[
            ("BIN_MANAGER_API", "http://env/api"),
            ("BIN_DOWNLOAD_URL", "http://cdn/"),
            ("BIN_MANAGER_TOKEN", " s3cret\n"),
        ]);
        let c = client_for(&Args::default(), &env, &m, cfg, &facts()).unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str(), c.token.as_deref()),
            ("http://env/api", "http://cdn", Some("s3cret"))
        );
        let args = Args {
            api: Some("https://flag/api".into()),
            ..Args::default()
        };
        let c = client_for(&args, &env, &m, cfg, &facts()).unwrap();
        assert_eq!(c.api, "https://flag/api");
        let args = Args {
            api: Some("ftp://x".into()),
            ..Args::default()
        };
        assert_eq!(
            client_for(&args, &none, &m, cfg, &facts())
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn config_path_precedence() {
        let env = env_of(&[("BIN_PROXY_CONFIG", "/env.json")]);
        assert_eq!(
            config_path(&Args::default(), &env_of(&[])),
            PathBuf::from(DEFAULT_PATH)
        );
        assert_eq!(
            config_path(&Args::default(), &env),
            PathBuf::from("/env.json")
        );
        let args = Args {
            config: Some("/flag.json".into()),
            ..Args::default()
        };
        assert_eq!(config_path(&args, &env), PathBuf::from("/flag.json"));
    }
}

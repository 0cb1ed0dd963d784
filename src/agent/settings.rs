//! Where the agent finds its settings, each from the first place that has
//! it: flag, environment, manifest, default. The API and download URLs, the
//! bearer token, and the facts this node reports about itself.

use super::client::Client;
use super::host;
use super::http::proxy::Proxies;
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
    let api = api_url(args, env, Some(manifest), config)?;
    let download_base = match setting(
        &args.download_url,
        env,
        "BIN_DOWNLOAD_URL",
        &manifest.manager.download_url,
    ) {
        Some((url, from)) => checked(url, from, "--download-url", "manager.downloadUrl", config)?,
        None => format!("{api}/download"),
    };
    let download_base = download_base.trim_end_matches('/').to_string();
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
        proxies: if args.no_proxy {
            Proxies::default()
        } else {
            Proxies::from_env(env)?
        },
    })
}

/// The API base: `--api`, else `BIN_MANAGER_API`, else the manifest's
/// `manager.api` (when there is a manifest), else [`DEFAULT_API`]; a URL
/// the agent cannot use is an error naming where it came from.
pub fn api_url(
    args: &Args,
    env: Env,
    manifest: Option<&Manifest>,
    config: &Path,
) -> Result<String> {
    let from_manifest = manifest.and_then(|m| m.manager.api.clone());
    let api = match setting(&args.api, env, "BIN_MANAGER_API", &from_manifest) {
        Some((url, from)) => checked(url, from, "--api", "manager.api", config)?,
        None => DEFAULT_API.to_string(),
    };
    Ok(api.trim_end_matches('/').to_string())
}

/// Where a setting was found.
#[derive(Clone, Copy)]
enum From {
    Flag,
    Env(&'static str),
    Manifest,
}

/// The first of flag, environment variable `key`, manifest value.
fn setting(
    flag: &Option<String>,
    env: Env,
    key: &'static str,
    manifest: &Option<String>,
) -> Option<(String, From)> {
    if let Some(v) = flag {
        return Some((v.clone(), From::Flag));
    }
    if let Some(v) = env(key) {
        return Some((v, From::Env(key)));
    }
    manifest.clone().map(|v| (v, From::Manifest))
}

/// `url` unless the agent cannot use it; the error names the flag, the
/// environment variable or the manifest key it came from.
fn checked(url: String, from: From, flag: &str, key: &str, config: &Path) -> Result<String> {
    let Some(problem) = crate::protocol::url_problem(&url) else {
        return Ok(url);
    };
    Err(match from {
        From::Flag => Error::Usage(format!("{flag} \"{url}\" {problem}")),
        From::Env(var) => Error::Usage(format!("${var} \"{url}\" {problem}")),
        From::Manifest => Error::Config {
            path: config.to_path_buf(),
            msg: format!("{key} \"{url}\" {problem}"),
        },
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
    }

    #[test]
    fn a_bad_url_names_where_it_came_from() {
        let cfg = Path::new("/m.json");
        let check =
            |args: Args, env: &dyn Fn(&str) -> Option<String>, m: &Manifest, expected: &str| {
                let e = client_for(&args, env, m, cfg, &facts()).unwrap_err();
                assert_eq!(e.to_string(), expected);
                assert_eq!(e.exit_code(), 2);
            };
        let mut m = Manifest::default();
        let flag = |api: &str| Args {
            api: Some(api.into()),
            ..Args::default()
        };
        let must = "must start with http:// or https://";
        check(
            flag("mgr:8081/api/v1"),
            &env_of(&[]),
            &m,
            &format!("--api \"mgr:8081/api/v1\" {must} (see --help)"),
        );
        check(
            Args::default(),
            &env_of(&[("BIN_MANAGER_API", "ftp://mgr/api")]),
            &m,
            &format!("$BIN_MANAGER_API \"ftp://mgr/api\" {must} (see --help)"),
        );
        check(
            Args::default(),
            &env_of(&[("BIN_DOWNLOAD_URL", "cdn/bins")]),
            &m,
            &format!("$BIN_DOWNLOAD_URL \"cdn/bins\" {must} (see --help)"),
        );
        m.manager.api = Some("mgr/api".into());
        check(
            Args::default(),
            &env_of(&[]),
            &m,
            &format!("\"/m.json\": manager.api \"mgr/api\" {must}"),
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

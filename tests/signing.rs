use testkit as common;

// Signed releases (issue 15): the real `bin-manager keygen` / `sign` and the
// real `bin-proxy` against a compromised server. The server is either the
// real bin-manager whose binDir the attacker writes (arbitrary builds, copied
// or edited signatures, old builds, rotation statements) or, where the attack
// is on the wire, the recording fake bin-manager of testkit (tampered
// bytes with matching hashes, endless data, a hostile mirror through
// downloadUrl). Every refusal asserts the exit code, the message naming the
// attack, the managed file and target dir unchanged, and that nothing was
// reported as installed.

use common::host::{assert_unchanged, install_file, snapshot, Host, Ran, NODE};
use common::manager::{run_cli, Manager};
use common::{md5_hex, wait_until, Fault, TempDir};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
const NEW: &[u8] = b"#!/bin/sh\necho new build, signed\n";
const EVIL: &[u8] = b"#!/bin/sh\necho attacker build\n";
const CLI: Duration = Duration::from_secs(30);

/// `bin-manager keygen --out DIR`; returns (secret key file, public key file, key id).
fn keygen(dir: &Path) -> (PathBuf, PathBuf, String) {
    let (code, out, err) = run_cli(&["keygen", "--out", dir.to_str().unwrap()], &[], CLI);
    assert_eq!(code, 0, "keygen failed: {err}");
    let id = out
        .split_whitespace()
        .nth(2)
        .expect("key id printed")
        .to_string();
    assert_eq!(id.len(), 16, "{out}");
    (dir.join("release.key"), dir.join("release.pub"), id)
}

/// `bin-manager sign --key KEY --name NAME EXTRA… BUILD`: the document printed.
fn sign(key: &Path, name: &str, extra: &[&str], build: &Path) -> String {
    let mut args = vec!["sign", "--key", key.to_str().unwrap(), "--name", name];
    args.extend_from_slice(extra);
    args.push(build.to_str().unwrap());
    let (code, out, err) = run_cli(&args, &[], CLI);
    assert_eq!(code, 0, "sign failed: {err}");
    let line = out.trim().to_string();
    assert_eq!(
        fs::read_to_string(format!("{}.sig", build.display())).unwrap(),
        format!("{line}\n"),
        "sign writes BUILD.sig"
    );
    line
}

/// A host managing opt/app (OLD installed) that trusts `keys`.
fn host(keys: &[&Path], version: &str) -> Host {
    let host = Host::new();
    install_file(&host, "app", OLD, 0o755);
    let keys: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", k.display()))
        .collect();
    host.write_manifest(&format!(
        r#"{{
  "manager": {{ "trustedKeys": [{}] }},
  "node": {{ "name": "{NODE}", "cpuArch": "x86_64", "osRelease": "Test OS 1", "proxyVersion": "1.0.0" }},
  "binaries": [
    {{ "name": "app", "version": "{version}", "hash": "{}", "path": "{}", "restart": "none" }}
  ]
}}
"#,
        keys.join(", "),
        md5_hex(OLD),
        host.target("app").display()
    ));
    host
}

/// Runs the agent once against `api`.
fn run(host: &Host, api: &str) -> Ran {
    Ran::bounded(
        host.command(&["--only", "app"]).env("BIN_MANAGER_API", api),
        CLI,
        "bin-proxy",
    )
}

/// Writes `bytes` to `dir/name` (a build the operator signs).
fn build(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// The real bin-manager with `bytes` published as binDir/app and `sig` (if
/// any) as binDir/app.sig, written first as the issue says.
fn publish(m: &Manager, bytes: &[u8], sig: Option<&str>) {
    let sig_path = m.bin_dir().join("app.sig");
    match sig {
        Some(s) => fs::write(&sig_path, format!("{s}\n")).unwrap(),
        None => {
            let _ = fs::remove_file(&sig_path);
        }
    }
    m.publish_mv("app", bytes);
}

/// What the real bin-manager was told this node runs.
fn reports(m: &Manager) -> Vec<String> {
    m.log_lines()
        .into_iter()
        .filter(|l| l.contains("POST /api/v1/bins/app"))
        .collect()
}

/// The refusal every attack must end in.
fn refused(host: &Host, ran: &Ran, before: &common::host::Snapshot, words: &[&str]) {
    ran.expect_code(1);
    for w in words {
        ran.expect_log(w);
    }
    ran.expect_log("nothing installed");
    assert_unchanged(host, before, ran);
    assert_eq!(fs::read(host.target("app")).unwrap(), OLD);
}

struct Keys {
    _dir: TempDir,
    key: PathBuf,
    public: PathBuf,
    id: String,
}

fn keys() -> Keys {
    let dir = TempDir::new();
    let (key, public, id) = keygen(&dir.join("k"));
    Keys {
        _dir: dir,
        key,
        public,
        id,
    }
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite_it() {
    let k = keys();
    assert_eq!(common::mode(&k.key), 0o600);
    let pubtext = fs::read_to_string(&k.public).unwrap();
    assert!(pubtext.starts_with("bin-proxy-public-key-v1 "), "{pubtext}");
    let before = fs::read(&k.key).unwrap();
    let dir = k.key.parent().unwrap().to_str().unwrap().to_string();
    let (code, _, err) = run_cli(&["keygen", "--out", &dir], &[], CLI);
    assert_eq!(code, 1);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(&k.key).unwrap(), before);
    // Serials go up per name, from the previous signature.
    let d = TempDir::new();
    let b = build(&d, "app", NEW);
    let first = sign(&k.key, "app", &[], &b);
    let second = sign(&k.key, "app", &["--arch", "x86_64", "--version", "2"], &b);
    assert!(
        first.contains(" serial=1 ") && first.contains(" arch=* version=- "),
        "{first}"
    );
    assert!(
        second.contains(" serial=2 ") && second.contains(" arch=x86_64 version=2 "),
        "{second}"
    );
    assert!(first.contains(&format!("key={}", k.id)));
    let pinned = sign(&k.key, "app", &["--serial", "40"], &b);
    assert!(pinned.contains(" serial=40 "), "{pinned}");
}

#[test]
fn a_signed_build_installs_and_unsigned_or_foreign_ones_do_not() {
    let k = keys();
    let other = keys();
    let d = TempDir::new();
    let m = Manager::start(&[]);
    let host = host(&[&k.public], "latest");

    // An arbitrary build: no signature at all.
    publish(&m, EVIL, None);
    let before = snapshot(&host);
    let ran = run(&host, &m.api());
    refused(&host, &ran, &before, &["no signature"]);

    // Signed, but by a key this host does not trust.
    let evil = build(&d, "evil", EVIL);
    publish(&m, EVIL, Some(&sign(&other.key, "app", &[], &evil)));
    let ran = run(&host, &m.api());
    refused(
        &host,
        &ran,
        &before,
        &[&format!("signed by unknown key {}", other.id)],
    );

    // A genuine signature of NEW whose fields were edited to cover EVIL.
    let new = build(&d, "new", NEW);
    let genuine = sign(&k.key, "app", &[], &new);
    let forged = genuine
        .replace(&common::sha256_hex(NEW), &common::sha256_hex(EVIL))
        .replace(
            &format!("size={}", NEW.len()),
            &format!("size={}", EVIL.len()),
        );
    publish(&m, EVIL, Some(&forged));
    let ran = run(&host, &m.api());
    refused(&host, &ran, &before, &["bad signature"]);

    // A truncated one.
    publish(&m, NEW, Some(&genuine[..genuine.len() - 20]));
    let ran = run(&host, &m.api());
    refused(&host, &ran, &before, &["malformed or truncated signature"]);
    assert!(reports(&m).is_empty(), "{:?}", reports(&m));

    // The genuine one installs.
    publish(&m, NEW, Some(&genuine));
    let ran = run(&host, &m.api());
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    assert!(
        wait_until(Duration::from_secs(5), || !reports(&m).is_empty()),
        "the install was reported"
    );
}

#[test]
fn mix_and_match_signatures_are_refused() {
    let k = keys();
    let d = TempDir::new();
    let m = Manager::start(&[]);
    let host = host(&[&k.public], "latest");
    let before = snapshot(&host);
    let new = build(&d, "new", NEW);
    // Another binary's genuine signature of these very bytes.
    publish(&m, NEW, Some(&sign(&k.key, "other", &[], &new)));
    let ran = run(&host, &m.api());
    refused(
        &host,
        &ran,
        &before,
        &["mix-and-match", "binary \"other\", not \"app\""],
    );
    // Another arch's.
    publish(
        &m,
        NEW,
        Some(&sign(&k.key, "app", &["--arch", "aarch64"], &new)),
    );
    let ran = run(&host, &m.api());
    refused(
        &host,
        &ran,
        &before,
        &["mix-and-match", "arch \"aarch64\", not \"x86_64\""],
    );
    assert!(reports(&m).is_empty());

    // Another version's, for a host that pins one.
    let pinned = self::host(&[&k.public], "2.0");
    let before = snapshot(&pinned);
    let sig = sign(&k.key, "app", &["--version", "1.0"], &new);
    fs::write(m.bin_dir().join("app@2.0.sig"), format!("{sig}\n")).unwrap();
    m.publish_mv("app@2.0", NEW);
    let ran = run(&pinned, &m.api());
    refused(
        &pinned,
        &ran,
        &before,
        &["mix-and-match", "version \"1.0\", not \"2.0\""],
    );
}

#[test]
fn rollback_and_freeze_are_refused() {
    let k = keys();
    let d = TempDir::new();
    let m = Manager::start(&[]);
    let host = host(&[&k.public], "latest");
    // An old build, genuinely signed (serial 1), then the new one (serial 2).
    let old2 = b"#!/bin/sh\necho an old signed build\n";
    let old_sig = sign(&k.key, "app", &[], &build(&d, "old", old2));
    let new_sig = sign(&k.key, "app", &[], &build(&d, "new", NEW));
    assert!(new_sig.contains(" serial=2 "), "{new_sig}");
    publish(&m, NEW, Some(&new_sig));
    run(&host, &m.api()).expect_code(0);
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    let state = fs::read_to_string(format!("{}.state", host.manifest.display())).unwrap();
    assert!(state.contains("\"signedSerials\""), "{state}");

    // The compromised server goes back to the old signed build.
    publish(&m, old2, Some(&old_sig));
    let before = snapshot(&host);
    let ran = run(&host, &m.api());
    ran.expect_code(1)
        .expect_log("rollback: serial 1 is lower than 2")
        .expect_log("nothing installed");
    assert_unchanged(&host, &before, &ran);
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);

    // Freeze: a signature that has expired (1 s) is refused, naming both times.
    let short = sign(
        &k.key,
        "app",
        &["--expires", "1s"],
        &build(&d, "newer", EVIL),
    );
    let expires: u64 = short
        .split(" expires=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(
        wait_until(Duration::from_secs(5), || now() > expires),
        "clock never passed {expires}"
    );
    publish(&m, EVIL, Some(&short));
    let ran = run(&host, &m.api());
    ran.expect_code(1)
        .expect_log("expired")
        .expect_log(&format!("(Unix {expires}), the local clock says"))
        .expect_log("nothing installed");
    assert_unchanged(&host, &before, &ran);
}

#[test]
fn wire_attacks_tampering_endless_data_and_a_hostile_mirror() {
    let k = keys();
    let d = TempDir::new();
    let host = host(&[&k.public], "latest");
    let before = snapshot(&host);
    let genuine = sign(&k.key, "app", &[], &build(&d, "new", NEW));

    // Plain HTTP: bytes and both hashes replaced together, the genuine
    // signature passed on.
    host.server.publish("app", EVIL);
    host.server
        .fault("app", Fault::Signed(genuine.clone(), vec![]));
    let ran = run(&host, &host.server.api());
    refused(&host, &ran, &before, &["the build is not the one signed"]);
    assert!(host.server.reported("app").is_empty());

    // Endless data after the genuine bytes: cut at the signed size.
    host.server.publish("app", NEW);
    host.server.fault("app", Fault::Endless(genuine.clone()));
    let ran = run(&host, &host.server.api());
    ran.expect_code(1)
        .expect_log(&format!("more bytes than the {} signed", NEW.len()))
        .expect_log("kept the running version");
    assert_unchanged(&host, &before, &ran);
    assert!(host.server.reported("app").is_empty());

    // A hostile mirror (downloadUrl): the real server's answer is genuine,
    // the mirror serves other bytes.
    let m = Manager::start(&[]);
    publish(&m, NEW, Some(&genuine));
    host.server.publish("app", EVIL);
    host.server.fault("app", Fault::None);
    let ran = Ran::bounded(
        host.command(&[
            "--only",
            "app",
            "--download-url",
            &format!("{}/download", host.server.api()),
        ])
        .env("BIN_MANAGER_API", m.api()),
        CLI,
        "bin-proxy",
    );
    ran.expect_code(1)
        .expect_log("mismatch: expected")
        .expect_log("kept the running version");
    assert_unchanged(&host, &before, &ran);
    assert!(reports(&m).is_empty());
}

#[test]
fn key_rotation_one_step_at_a_time() {
    let a = keys();
    let b = keys();
    let c = keys();
    let d = TempDir::new();
    let host = host(&[&a.public], "latest");
    let before = snapshot(&host);
    let by_b = sign(&b.key, "app", &[], &build(&d, "new", NEW));
    // `bin-manager trust --key OLD.key NEW.pub`: the statement line.
    let statement = |signer: &Path, trusts: &Path| {
        let args = [
            "trust",
            "--key",
            signer.to_str().unwrap(),
            trusts.to_str().unwrap(),
        ];
        let (code, out, err) = run_cli(&args, &[], CLI);
        assert_eq!(code, 0, "trust failed: {err}");
        assert!(out.starts_with("bin-proxy-trust-v1 "), "{out}");
        out.trim().to_string()
    };
    // Signed by an untrusted key C: refused.
    host.server.publish("app", NEW);
    host.server.fault(
        "app",
        Fault::Signed(by_b.clone(), vec![statement(&c.key, &b.public)]),
    );
    let ran = run(&host, &host.server.api());
    refused(
        &host,
        &ran,
        &before,
        &[&format!("signed by untrusted key {}", c.id)],
    );
    // No statement at all: B is unknown.
    host.server
        .fault("app", Fault::Signed(by_b.clone(), vec![]));
    let ran = run(&host, &host.server.api());
    refused(
        &host,
        &ran,
        &before,
        &[&format!("signed by unknown key {}", b.id)],
    );
    assert!(host.server.reported("app").is_empty());
    // A (trusted) says "trust B": installs.
    host.server.fault(
        "app",
        Fault::Signed(by_b, vec![statement(&a.key, &b.public)]),
    );
    let ran = run(&host, &host.server.api());
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    assert_eq!(host.server.reported("app"), [md5_hex(NEW)]);
}

#[test]
fn bin_manager_validates_publishes_and_serves_signatures() {
    let k = keys();
    let other = keys();
    let d = TempDir::new();
    let m = Manager::start_with_config(
        &format!(
            r#"{{"requireSignatures": true, "trustedKeys": ["{}"]}}"#,
            k.public.display()
        ),
        &["--admin-token", "adm"],
    );
    let config = m.root.join("other.json");
    let put = |sig: Option<&str>, body: &[u8]| {
        let mut headers = vec![("Authorization", "Bearer adm".to_string())];
        if let Some(s) = sig {
            headers.push(("X-Bin-Signature", s.to_string()));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::http("PUT", &format!("{}/bins/app", m.api()), &headers, body)
    };
    let genuine = sign(&k.key, "app", &[], &build(&d, "new", NEW));
    let r = put(None, NEW);
    assert_eq!(r.status, 400, "{}", r.body_str());
    assert!(
        r.body_str()
            .contains("not signed and requireSignatures is set"),
        "{}",
        r.body_str()
    );
    let r = put(
        Some(&sign(&other.key, "app", &[], &build(&d, "o", NEW))),
        NEW,
    );
    assert!(
        r.body_str().contains("signed by unknown key"),
        "{}",
        r.body_str()
    );
    let r = put(Some(&genuine), EVIL);
    assert!(
        r.body_str().contains("not the one signed"),
        "{}",
        r.body_str()
    );
    assert!(!m.bin_dir().join("app").exists(), "nothing published");
    assert!(!m.bin_dir().join("app.sig").exists());

    let r = put(Some(&genuine), NEW);
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(fs::read(m.bin_dir().join("app")).unwrap(), NEW);
    assert_eq!(
        fs::read_to_string(m.bin_dir().join("app.sig")).unwrap(),
        format!("{genuine}\n")
    );
    let r = common::http("GET", &format!("{}/bins/app", m.api()), &[], b"");
    assert!(
        r.body_str()
            .contains(&format!("\"signature\":\"{genuine}\"")),
        "{}",
        r.body_str()
    );

    // Published with mv and no signature: not served.
    m.publish_mv("web", EVIL);
    let r = common::http("GET", &format!("{}/bins/web", m.api()), &[], b"");
    assert_eq!(r.status, 409, "{}", r.body_str());
    let r = common::http("GET", &format!("{}/download/web", m.api()), &[], b"");
    assert_eq!(r.status, 409);

    // requireSignatures without keys is a configuration error.
    fs::write(&config, r#"{"requireSignatures": true}"#).unwrap();
    let (code, err) = common::manager::run_to_exit(&["--config", config.to_str().unwrap()], CLI);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("requireSignatures needs trustedKeys"), "{err}");
}

#[test]
fn the_agent_updates_itself_only_to_a_build_that_passes_its_self_test() {
    let k = keys();
    let d = TempDir::new();
    let host = Host::new();
    let agent = fs::read(env!("CARGO_BIN_EXE_bin-proxy")).unwrap();
    install_file(&host, "bin-proxy", &agent, 0o755);
    host.write_manifest(&format!(
        r#"{{
  "manager": {{ "trustedKeys": ["{}"] }},
  "node": {{ "name": "{NODE}", "cpuArch": "x86_64", "osRelease": "Test OS 1", "proxyVersion": "1.0.0" }},
  "binaries": [
    {{ "name": "bin-proxy", "version": "latest", "hash": "{}", "path": "{}", "restart": "none" }}
  ]
}}
"#,
        k.public.display(),
        md5_hex(&agent),
        host.target("bin-proxy").display()
    ));
    // The installed copy is what runs: it replaces itself.
    let run_installed = || {
        let mut cmd = std::process::Command::new(host.target("bin-proxy"));
        cmd.arg("--config")
            .arg(&host.manifest)
            .env("BIN_MANAGER_API", host.server.api())
            .env("PATH", common::path_with(&host.bin))
            .env_remove("BIN_PROXY_CONFIG")
            .env_remove("BIN_DOWNLOAD_URL")
            .env_remove("BIN_MANAGER_TOKEN");
        common::without_proxies(&mut cmd);
        Ran::bounded(&mut cmd, Duration::from_secs(60), "the installed bin-proxy")
    };
    let publish_signed = |bytes: &[u8], file: &str| {
        let sig = sign(&k.key, "bin-proxy", &[], &build(&d, file, bytes));
        host.server.publish("bin-proxy", bytes);
        host.server.fault("bin-proxy", Fault::Signed(sig, vec![]));
    };

    // A broken agent, genuinely signed: held back, the running one stays.
    let broken = b"#!/bin/sh\necho broken >&2\nexit 1\n";
    publish_signed(broken, "broken");
    let before = snapshot(&host);
    let ran = run_installed();
    ran.expect_code(1)
        .expect_log("failed its self-test: it exited with exit status: 1")
        .expect_log("holding it back, the running agent stays");
    assert_unchanged(&host, &before, &ran);
    assert_eq!(fs::read(host.target("bin-proxy")).unwrap(), agent);
    assert!(!host.opt.join("bin-proxy.bak").exists());
    assert!(host.server.reported("bin-proxy").is_empty());
    let ran = run_installed();
    ran.expect_log("holding back");
    assert_eq!(fs::read(host.target("bin-proxy")).unwrap(), agent);

    // A good one (the real agent, a byte longer): run, then installed; the
    // previous agent stays as .bak.
    let mut good = agent.clone();
    good.extend_from_slice(b"\0v2");
    publish_signed(&good, "good");
    let ran = run_installed();
    ran.expect_code(0)
        .expect_log("passed its self-test (bin-proxy ");
    assert_eq!(fs::read(host.target("bin-proxy")).unwrap(), good);
    assert_eq!(fs::read(host.opt.join("bin-proxy.bak")).unwrap(), agent);
    assert_eq!(common::mode(&host.target("bin-proxy")), 0o755);
    assert_eq!(host.server.reported("bin-proxy"), [md5_hex(&good)]);
}

//! The first end-to-end look: register, upgrade, idle.
use testkit as common;

use common::host::{Host, NODE};
use common::{md5_hex, mode, temp_files};
use std::fs;

#[test]
fn registers_upgrades_then_idles() {
    let host = Host::new();
    let old = b"#!/bin/sh\necho old\n".to_vec();
    let new = b"#!/bin/sh\necho new build\n".to_vec();
    fs::write(host.target("myapp"), &old).unwrap();
    fs::set_permissions(
        host.target("myapp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    host.manifest_for(&[("myapp", &md5_hex(&old))]);
    host.server.publish("myapp", &new);

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
    assert_eq!(fs::read(host.opt.join("myapp.bak")).unwrap(), old);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(host.server.reported("myapp"), [md5_hex(&new)]);
    assert!(host.manifest_text().contains(&md5_hex(&new)));
    assert!(host.server.registration(NODE).is_some());
    assert!(temp_files(&host.opt).is_empty());
    eprintln!("{}", ran.stderr);

    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("1 binary: 1 up to date");
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    eprintln!("{}", ran.stderr);
}

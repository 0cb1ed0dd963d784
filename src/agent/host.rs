//! Facts about this host that fill the manifest's empty `node` fields:
//! hostname, `uname -m`, and `/etc/os-release` PRETTY_NAME. Read from files
//! the kernel and distribution provide, so they work without a libc or shell.

use std::fs;

/// The host name (`/proc/sys/kernel/hostname`, else `/etc/hostname`, else "localhost").
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The machine architecture as `uname -m` prints it.
pub fn cpu_arch() -> String {
    match std::env::consts::ARCH {
        "x86" => "i686".to_string(),
        "arm" => "armv7l".to_string(),
        arch => arch.to_string(), // x86_64, aarch64, riscv64, … match uname -m
    }
}

/// PRETTY_NAME from os-release, or "Linux" when there is none (a scratch container).
pub fn os_release() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .find_map(|text| pretty_name(&text))
        .unwrap_or_else(|| "Linux".to_string())
}

fn pretty_name(os_release: &str) -> Option<String> {
    let line = os_release
        .lines()
        .find_map(|l| l.trim().strip_prefix("PRETTY_NAME="))?;
    let value = line.trim().trim_matches(|c| c == '"' || c == '\'');
    (!value.is_empty()).then(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_name_forms() {
        assert_eq!(
            pretty_name("NAME=x\nPRETTY_NAME=\"Ubuntu 20.04.6 LTS\"\n").as_deref(),
            Some("Ubuntu 20.04.6 LTS")
        );
        assert_eq!(
            pretty_name("PRETTY_NAME='Alpine Linux v3.19'").as_deref(),
            Some("Alpine Linux v3.19")
        );
        assert_eq!(pretty_name("PRETTY_NAME=Plain").as_deref(), Some("Plain"));
        assert_eq!(pretty_name("NAME=x"), None);
        assert_eq!(pretty_name("PRETTY_NAME=\"\""), None);
    }
}

//! The environment check: by the time `main` runs, the dynamic loader has already honoured
//! `LD_PRELOAD`, `LD_LIBRARY_PATH` or `GLIBC_TUNABLES` (sshd passes what `authorized_keys`
//! `environment=` or `AcceptEnv` let through), so their presence means the deployment is
//! unsafe: refuse. Afterwards the environment is replaced by a fixed one (`sys::clear_env`).
//!
//! The deny-list follows util-linux `lib/env.c` and sudo's `initial_badenv_table`, narrowed to
//! what can act on this process (the loader, glibc, locale and resolver), plus the shell
//! variables WRAPPER-SECURITY §2.1 names.

use std::ffi::OsString;

use crate::authlog::escape;

const EXACT: &[&str] = &[
    "GLIBC_TUNABLES",
    "BASH_ENV",
    "ENV",
    "IFS",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    "TZDIR",
];

const PREFIXES: &[&str] = &["LD_", "MALLOC_"];

/// Locale and time-zone variables are harmless unless they name a path.
const NO_PATH: &[&str] = &["LANG", "LANGUAGE", "TZ"];

/// The names (escaped) of the variables that make the environment unsafe.
pub(crate) fn poisoned(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let mut bad = Vec::new();
    for (k, v) in vars {
        let (Some(name), value) = (k.to_str(), v.as_encoded_bytes()) else {
            bad.push(escape(k.as_encoded_bytes(), 64));
            continue;
        };
        let pathlike = value.contains(&b'/') || value.starts_with(b".");
        if EXACT.contains(&name)
            || PREFIXES.iter().any(|p| name.starts_with(p))
            || ((NO_PATH.contains(&name) || name.starts_with("LC_")) && pathlike)
        {
            bad.push(escape(name.as_bytes(), 64));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pairs: &[(&str, &str)]) -> Vec<String> {
        poisoned(pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))))
    }

    #[test]
    fn deny_list() {
        assert!(
            check(&[("PATH", "/bin"), ("SSH_CONNECTION", "1 2 3 4"), ("LANG", "C.UTF-8"), ("TZ", "UTC")]).is_empty()
        );
        assert_eq!(check(&[("LD_PRELOAD", "/x.so")]), ["LD_PRELOAD"]);
        assert_eq!(check(&[("LD_LIBRARY_PATH", "/x")]), ["LD_LIBRARY_PATH"]);
        assert_eq!(check(&[("GLIBC_TUNABLES", "x")]), ["GLIBC_TUNABLES"]);
        assert_eq!(check(&[("BASH_ENV", "x"), ("IFS", " ")]), ["BASH_ENV", "IFS"]);
        assert_eq!(check(&[("LC_ALL", "../../tmp/x"), ("TZ", "/tmp/zone")]), ["LC_ALL", "TZ"]);
    }
}

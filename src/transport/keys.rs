//! Private keys from files, as strictly as OpenSSH reads them: ed25519 and RSA keys in
//! OpenSSH format or PEM, optionally encrypted with a passphrase read from a file; a key file
//! (or passphrase file) that group or others may read or write is refused, naming the file and
//! its mode.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use russh::keys::{self, PrivateKey};

/// A passphrase, kept out of `Debug` output.
pub struct Passphrase(String);

impl Passphrase {
    /// The passphrase itself (a greppable name for the one place it is used).
    pub fn declassify(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(…)")
    }
}

/// Why a key file can't be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Group or others may read or write the file: OpenSSH's "UNPROTECTED PRIVATE KEY FILE".
    #[error(
        "permissions {mode:04o} for {} are too open: a private key (or its passphrase) must not be \
         accessible by group or others; run chmod 600 {}",
        path.display(),
        path.display()
    )]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is encrypted and no passphrase was given.
    #[error(
        "the private key {} is encrypted: set ssh_key_passphrase_file to a file holding its \
         passphrase, or load the key into ssh-agent and set SSH_AUTH_SOCK",
        path.display()
    )]
    Encrypted {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a key we can read, or the passphrase is wrong.
    #[error("can't use the private key {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// russh's reason.
        source: keys::Error,
    },
}

/// Opens `path` and checks, on the open file, that group and others have no access to it.
fn open_private(path: &Path) -> Result<String, KeyError> {
    let read = |source| KeyError::Read { path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(read)?;
    let meta = f.metadata().map_err(read)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode { path: path.to_path_buf(), mode });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

/// Reads a passphrase file: its first line, without the line end.
pub fn read_passphrase(path: &Path) -> Result<Passphrase, KeyError> {
    let text = open_private(path)?;
    let line = text.lines().next().unwrap_or("");
    Ok(Passphrase(line.to_owned()))
}

/// Loads a private key, with its passphrase if it has one.
pub fn load_private_key(path: &Path, passphrase: Option<&Passphrase>) -> Result<PrivateKey, KeyError> {
    let text = open_private(path)?;
    match keys::decode_secret_key(&text, passphrase.map(Passphrase::declassify)) {
        Ok(k) => Ok(k),
        Err(keys::Error::KeyIsEncrypted) => Err(KeyError::Encrypted { path: path.to_path_buf() }),
        Err(source) => Err(KeyError::Parse { path: path.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let p = dir.join(name);
        let st = Command::new("ssh-keygen")
            .args(["-q", "-C", "test"])
            .args(args)
            .arg("-f")
            .arg(&p)
            .stdin(Stdio::null())
            .status()
            .expect("ssh-keygen (openssh-client) is needed for this test");
        assert!(st.success());
        p
    }

    #[test]
    fn formats_modes_and_passphrases() {
        let dir = tempfile::tempdir().unwrap();
        let ed = keygen(dir.path(), "ed", &["-t", "ed25519", "-N", ""]);
        let pem = keygen(dir.path(), "pem", &["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", ""]);
        let enc = keygen(dir.path(), "enc", &["-t", "ed25519", "-N", "sesame"]);
        assert!(load_private_key(&ed, None).is_ok());
        assert!(load_private_key(&pem, None).is_ok());
        let e = load_private_key(&enc, None).unwrap_err();
        assert!(matches!(e, KeyError::Encrypted { .. }), "{e}");
        assert!(e.to_string().contains("ssh_key_passphrase_file"), "{e}");
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "sesame\n").unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = read_passphrase(&pass).unwrap();
        assert_eq!(format!("{p:?}"), "Passphrase(…)");
        assert!(load_private_key(&enc, Some(&p)).is_ok());
        let wrong = Passphrase("wrong".into());
        assert!(matches!(load_private_key(&enc, Some(&wrong)), Err(KeyError::Parse { .. })));
        std::fs::set_permissions(&ed, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_private_key(&ed, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "permissions 0640 for {0} are too open: a private key (or its passphrase) must not be \
                 accessible by group or others; run chmod 600 {0}",
                ed.display()
            )
        );
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(read_passphrase(&pass), Err(KeyError::Mode { mode: 0o604, .. })));
        assert!(matches!(load_private_key(&dir.path().join("none"), None), Err(KeyError::Read { .. })));
    }
}

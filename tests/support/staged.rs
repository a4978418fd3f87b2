//! Examples whose certificates a script makes: `examples/NAME-pki.sh` writes the files that
//! `examples/NAME.yaml` names under `NAME-pki/` (relative paths are taken from the config file's
//! folder). Such demo material is made fresh on each machine and never committed, so a test
//! checks the example in a copy beside material the script has just made.
#![allow(dead_code)] // each test crate uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

/// A config file ready to load: the shipped file itself, or a copy beside its certificates.
pub struct Staged {
    /// Where the file is.
    pub path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// `config` itself when no `NAME-pki.sh` sits beside it; otherwise a copy of it in a temporary
/// folder, with the certificates the script made in `NAME-pki/` next to it.
pub fn staged(config: &Path) -> Staged {
    let stem = config.file_stem().unwrap().to_str().unwrap();
    let script = config.with_file_name(format!("{stem}-pki.sh"));
    if !script.exists() {
        return Staged {
            path: config.to_owned(),
            _dir: None,
        };
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(config.file_name().unwrap());
    std::fs::copy(config, &path).unwrap();
    make_pki(&script, &dir.path().join(format!("{stem}-pki")));
    Staged {
        path,
        _dir: Some(dir),
    }
}

/// Runs `bash SCRIPT OUT`, which writes its certificates in `OUT`.
pub fn make_pki(script: &Path, out: &Path) {
    let run = Command::new("bash")
        .arg(script)
        .arg(out)
        .output()
        .expect("bash runs");
    assert!(
        run.status.success(),
        "{} failed (openssl is installed by .ci/run): {}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
}

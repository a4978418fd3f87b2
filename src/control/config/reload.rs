//! Noticing that the config file changed.
//!
//! The file's directory is watched rather than the file, because the common ways of replacing a
//! config all change the directory: an editor's atomic rename, and the Kubernetes ConfigMap swap
//! of the `..data` symlink. In-place writes show up there too. If the path is a symlink, the
//! directory of its target is watched as well. Bursts of events are coalesced and the reader
//! compares content hashes, so a change is applied once however many events it caused.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last file event before the file is read, so that a file being written
/// in several steps is read once it is complete.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// A live watch: keeps the OS watcher alive and yields a unit per burst of events.
pub struct Changes {
    _watcher: RecommendedWatcher,
    rx: mpsc::Receiver<()>,
}

/// Starts watching the directories that can change what `path` reads as.
pub fn watch(path: &Path) -> notify::Result<Changes> {
    watch_all(&[path])
}

/// Starts watching the directories that can change what any of `paths` reads as (a certificate,
/// its key and a CA bundle, say).
pub fn watch_all(paths: &[&Path]) -> notify::Result<Changes> {
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a pending change; dropping this one loses nothing.
            let _ = tx.try_send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = paths.iter().flat_map(|p| directories(p)).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok(Changes {
        _watcher: watcher,
        rx,
    })
}

fn directories(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![parent(path)];
    if let Ok(target) = std::fs::canonicalize(path) {
        let d = parent(&target);
        if std::fs::canonicalize(&dirs[0]).ok().as_ref() != Some(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Calls `reload` once after each settled burst of changes, until the watch ends.
pub async fn on_change<F, Fut>(mut changes: Changes, mut reload: F)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    while changes.rx.recv().await.is_some() {
        loop {
            tokio::select! {
                more = changes.rx.recv() => if more.is_none() { return },
                () = tokio::time::sleep(DEBOUNCE) => break,
            }
        }
        reload().await;
    }
}

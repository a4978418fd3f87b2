//! Noticing that a file changed: the config file, and the certificate files of listeners and
//! clusters.
//!
//! The file's directory is watched rather than the file, because the common ways of replacing a
//! config or a certificate all change the directory: an editor's atomic rename, and the Kubernetes ConfigMap swap
//! of the `..data` symlink. In-place writes show up there too. If the path is a symlink, the
//! directory of its target is watched as well. Bursts of events are coalesced and the reader
//! compares content hashes, so a change is applied once however many events it caused.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
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
    let names = relevant_names(paths);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Reading the file is an event too (open, access, close): only writes count, or every
        // read after a change would cause the next one.
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return;
            }
        }
        // Other files in the same directory (a log written beside the config, say) are not
        // changes; without this filter they would make the file be read again and again.
        let relevant = event.paths.is_empty()
            || event.paths.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| names.iter().any(|w| w == n) || n.starts_with("..data"))
            });
        if relevant {
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

/// The file names whose events matter: each path's own name and, for a symlink, its target's.
/// Kubernetes' `..data` swaps are matched separately.
fn relevant_names(paths: &[&Path]) -> Vec<String> {
    let mut names = Vec::new();
    for p in paths {
        let own = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let target = std::fs::canonicalize(p)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        names.extend(own.into_iter().chain(target));
    }
    names.sort();
    names.dedup();
    names
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A watch that the test feeds instead of the operating system; send with `try_send`, as the
    /// watcher's callback does.
    fn fed_by_test() -> (mpsc::Sender<()>, Changes) {
        let (tx, rx) = mpsc::channel(1);
        let watcher = notify::recommended_watcher(|_: notify::Result<notify::Event>| {}).unwrap();
        (
            tx,
            Changes {
                _watcher: watcher,
                rx,
            },
        )
    }

    /// Runs `on_change` with a reload that counts its starts and takes `takes`.
    fn counting(
        changes: Changes,
        takes: Duration,
    ) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let started = Arc::new(AtomicUsize::new(0));
        let count = started.clone();
        let task = tokio::spawn(on_change(changes, move || {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(takes)
        }));
        (started, task)
    }

    async fn advance(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_is_read_once_after_the_quiet_time() {
        let (tx, changes) = fed_by_test();
        let (reloads, task) = counting(changes, Duration::ZERO);
        // Events 40 ms apart for 400 ms, as a file written in steps: one burst.
        for _ in 0..10 {
            let _ = tx.try_send(());
            advance(40).await;
        }
        assert_eq!(reloads.load(Ordering::SeqCst), 0, "not while events come");
        advance(9).await; // 49 ms after the last event
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            0,
            "not before 50 ms of quiet"
        );
        advance(2).await;
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            1,
            "once, after 50 ms of quiet"
        );
        // A later burst is read again.
        let _ = tx.try_send(());
        advance(51).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 2);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_reload_is_read_after_it() {
        let (tx, changes) = fed_by_test();
        let (reloads, task) = counting(changes, Duration::from_secs(1));
        let _ = tx.try_send(());
        advance(51).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 1, "the first reload runs");
        // Two events while it runs: kept, and read once it is done.
        let _ = tx.try_send(());
        advance(500).await;
        let _ = tx.try_send(());
        advance(500).await; // the first reload ends about now
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        advance(51).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 2, "the change is not lost");
        advance(2_000).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 2, "and read only once");
        drop(tx);
        task.await.unwrap();
    }
}

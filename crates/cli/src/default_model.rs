//! The model `serve`, `chat` and `eval` run when no `--model` is given: r1-tiny, the project's own
//! ~1.5M-parameter reasoning model, embedded in the binary so that `r1serve chat` works with
//! nothing downloaded.
//!
//! The loaders memory-map files, so the embedded bytes are written once to a cache directory named
//! after their content hash (`<cache>/r1serve/r1-tiny-<16 hex>`): a new binary with other weights
//! never picks up an old copy. The directory is filled under a temporary name and renamed into
//! place, so another process never sees it half-written; a directory whose files differ from the
//! embedded ones (a crash of an older tool, a user's edit) is set aside and written again.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// The name the embedded model is served and shown under.
pub const NAME: &str = "r1-tiny";

macro_rules! embedded {
    ($($file:literal),* $(,)?) => {
        [$(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/r1-tiny/", $file)) as &[u8])),*]
    };
}

/// The files the loaders read (the weights, the tokenizer and its chat template, the configs).
const FILES: [(&str, &[u8]); 5] = embedded![
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// The model to run: `--model` when given (checked to exist), else the embedded r1-tiny,
/// extracted on first use.
pub fn resolve(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(path) => {
            let path = crate::model_dir(path)?;
            info!(model = %path.display(), "using the model given by --model");
            Ok(path)
        }
        None => {
            let dir = extract()?;
            info!(model = NAME, path = %dir.display(), "no --model given: using the embedded model");
            Ok(dir)
        }
    }
}

/// How a model is named to the user: r1-tiny, or the `--model` path as given.
pub fn display_name(model: Option<&Path>) -> String {
    model.map_or_else(|| NAME.to_owned(), |p| p.display().to_string())
}

/// The directory holding the embedded model's files, written there first if need be. Tries the
/// user's cache directory, then the system temp dir (a read-only home must not stop `chat`).
pub fn extract() -> anyhow::Result<PathBuf> {
    let name = format!("{NAME}-{}", content_hash());
    let mut failures = Vec::new();
    for root in cache_roots() {
        match extract_into(&root, &name) {
            Ok(dir) => return Ok(dir),
            Err(e) => {
                warn!(root = %root.display(), "cannot use this cache directory: {e:#}");
                failures.push(format!("{e:#}"));
            }
        }
    }
    bail!("cannot extract the embedded model {NAME}: {}", failures.join("; "))
}

/// First 16 hex digits of the SHA-256 over every file's name, length and bytes.
fn content_hash() -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in FILES {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `$XDG_CACHE_HOME/r1serve`, else `$HOME/.cache/r1serve`, then the temp dir's `r1serve`.
fn cache_roots() -> Vec<PathBuf> {
    let env_dir = |key: &str| {
        std::env::var_os(key)
            .map(PathBuf::from)
            // The XDG spec says relative paths are invalid and must be ignored.
            .filter(|p| p.is_absolute())
    };
    let user = env_dir("XDG_CACHE_HOME").or_else(|| env_dir("HOME").map(|home| home.join(".cache")));
    user.into_iter()
        .chain([std::env::temp_dir()])
        .map(|base| base.join("r1serve"))
        .collect()
}

/// `root/name` with the embedded files, written through a staging directory if it is not there
/// already (or differs).
fn extract_into(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let target = root.join(name);
    if is_complete(&target) {
        return Ok(target);
    }
    if target.exists() {
        warn!(path = %target.display(), "the cached model is incomplete or altered: extracting it again");
    }
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.staging-"))
        .tempdir_in(root)
        .with_context(|| format!("cannot create a staging directory in {}", root.display()))?;
    for (file, bytes) in FILES {
        write_file(&staging.path().join(file), bytes)?;
    }
    // A few rounds: each failed rename means another process changed `target` meanwhile.
    for _ in 0..3 {
        match fs::rename(staging.path(), &target) {
            Ok(()) => {
                let _ = staging.keep();
                info!(path = %target.display(), "extracted the embedded model");
                return Ok(target);
            }
            // Another process put a good copy in place first; the staging dir is removed on drop.
            Err(_) if is_complete(&target) => return Ok(target),
            Err(_) if target.exists() => set_aside(root, &target)?,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot move {} to {}", staging.path().display(), target.display()))
            }
        }
    }
    bail!(
        "cannot put the model in place at {}: it keeps changing",
        target.display()
    )
}

/// Whether `dir` holds exactly the embedded bytes (sizes first, so a truncated file costs no read).
fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(file, bytes)| {
        let path = dir.join(file);
        fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
            && fs::read(&path).is_ok_and(|found| found == *bytes)
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    // Synced before the rename publishes it, so a crash cannot leave a complete-looking dir with
    // empty files.
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Moves a bad `target` out of the way (into a temporary directory removed on return), so that a
/// rename can replace it; a process reading it keeps its open files.
fn set_aside(root: &Path, target: &Path) -> anyhow::Result<()> {
    let trash = tempfile::Builder::new()
        .prefix(".stale-")
        .tempdir_in(root)
        .with_context(|| format!("cannot create a directory in {}", root.display()))?;
    match fs::rename(target, trash.path().join("old")) {
        Ok(()) => Ok(()),
        // Someone else moved it already.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot move the stale {} aside", target.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_is_idempotent_and_repairs_a_partial_dir() {
        let root = tempfile::tempdir().unwrap();
        let first = extract_into(root.path(), "m").unwrap();
        assert!(is_complete(&first));
        let modified = fs::metadata(first.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(extract_into(root.path(), "m").unwrap(), first);
        let again = fs::metadata(first.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(modified, again, "a complete copy is not rewritten");

        fs::remove_file(first.join("model.safetensors")).unwrap();
        assert!(!is_complete(&first));
        assert_eq!(extract_into(root.path(), "m").unwrap(), first);
        assert!(is_complete(&first));
        // Nothing left behind but the model itself.
        let entries: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["m"]);
    }

    #[test]
    fn concurrent_extractions_agree() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| extract_into(root.path(), "m").unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(dirs.iter().all(|d| d == &dirs[0] && is_complete(d)));
    }

    #[test]
    fn hash_is_16_hex_digits() {
        let hash = content_hash();
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

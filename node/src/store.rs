//! What the agent keeps in its data dir, written atomically (temp file,
//! fsync, rename) so a crash never leaves a half-written file behind.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A failure to read or write the data dir.
/// Wall-clock milliseconds since 1970: the floor for generations and
/// catalog versions, which must beat every earlier run of this node even
/// when the data dir was lost.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
#[error("data dir {path}: {source}")]
pub struct StoreError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// A member remembered across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMember {
    /// Node name.
    pub name: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// `state.json`: what must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The last generation this node ran as.
    pub generation: u64,
    /// Members that were alive when last saved.
    pub members: Vec<SavedMember>,
}

/// The agent's data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the data dir.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `state.json`. A missing file is a fresh start; an unreadable one
    /// is set aside (renamed `.corrupt`) so it can be inspected, and we start
    /// fresh: it only holds a cache of peers and a counter we can rebuild.
    pub fn load_state(&self) -> SavedState {
        let path = self.dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable state file set aside");
                    let _ = std::fs::rename(&path, path.with_extension("json.corrupt"));
                    SavedState::default()
                }
            },
            Err(_) => SavedState::default(),
        }
    }

    /// Writes `state.json` atomically.
    pub fn save_state(&self, state: &SavedState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        self.write_atomic("state.json", &bytes)
    }

    /// Writes `name` in the data dir atomically.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let fail = |source| StoreError {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(bytes).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        // Make the rename itself durable.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Writes `value` as pretty JSON to `name`, atomically.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).expect("serializable");
        self.write_atomic(name, &bytes)
    }

    /// Reads JSON from `name`; a missing file gives the default.
    pub fn read_json<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, StoreError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(StoreError { path, source }),
        }
    }

    /// Removes a file from the data dir, ignoring a missing one.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_state(), SavedState::default());
        let state = SavedState {
            generation: 42,
            members: vec![SavedMember {
                name: "n1".into(),
                addr: "127.0.0.1:7946".parse().unwrap(),
            }],
        };
        store.save_state(&state).unwrap();
        assert_eq!(store.load_state(), state);
        std::fs::write(dir.path().join("state.json"), b"{garbage").unwrap();
        assert_eq!(store.load_state(), SavedState::default());
        assert!(dir.path().join("state.json.corrupt").exists());
    }
}

//! Images into Hangar's store: Dockerfile builds (buildah), imports (OCI layouts and
//! archives) and base images made with debootstrap.

use std::path::PathBuf;

/// The image service: builds, imports and bootstraps images into the store.
#[derive(Clone)]
pub struct Images {
    pub data_dir: PathBuf,
    pub store: hangar_store::Store,
}

impl Images {
    pub fn new(data_dir: PathBuf, store: hangar_store::Store) -> Images {
        Images { data_dir, store }
    }
}

//! Shared helpers of dnd's end-to-end tests.

use std::path::PathBuf;

/// `tests/fixtures/` of this repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `dnd` binary built for these tests.
pub fn dnd_binary() -> PathBuf {
    // Integration tests live in this package, not in dnd-cli, so CARGO_BIN_EXE_dnd is not
    // set; the binary sits beside the test executable's parent directory.
    let mut dir = std::env::current_exe().expect("the test knows its own path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("dnd{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: build it with `cargo build -p dnd-cli` (cargo test --workspace does)", bin.display());
    bin
}

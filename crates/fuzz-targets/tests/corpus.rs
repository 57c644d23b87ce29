//! Replays every committed corpus file, `fuzz/corpus/<target>/*`, through its target on stable
//! Rust, so that `cargo test` catches a regression of anything the fuzzers once found or
//! covered without nightly or libFuzzer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

fn replay(target: &str) {
    let function = fuzz_targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|&(_, function)| function)
        .expect("a target of that name");
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| function(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target} fails on {} of {} files: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn every_target_has_a_corpus() {
    for (target, _) in fuzz_targets::TARGETS {
        assert!(corpus_dir(target).is_dir(), "fuzz/corpus/{target} is missing");
    }
}

#[test]
fn command_line() {
    replay("command_line");
}

#[test]
fn address() {
    replay("address");
}

#[test]
fn data_decoder() {
    replay("data_decoder");
}

#[test]
fn bdat() {
    replay("bdat");
}

#[test]
fn server_session() {
    replay("server_session");
}

#[test]
fn sasl() {
    replay("sasl");
}

#[test]
fn client_reply() {
    replay("client_reply");
}

//! Replays the saved cargo-fuzz corpora (`fuzz/corpus/*`) through the fuzz targets'
//! properties, so CI checks every input the fuzzers found without a fuzzing engine.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(target: &str, check: fn(&[u8])) {
    let inputs = corpus(target);
    assert!(inputs.len() >= 10, "the {target} corpus is nearly empty");
    for (path, data) in inputs {
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{} fails the {target} property", path.display());
        }
    }
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", relay_common::fuzzing::frames);
}

#[test]
fn router_corpus() {
    replay("router", relay_server::user::router::fuzz_check);
}

//! Fuzzing the two parsers that take bytes from outside: the job decoder
//! (every message body) and the dead-letter import parser (every line of an
//! export file). cargo-fuzz needs a nightly toolchain this machine does not
//! have, so this is a seeded mutation fuzzer over arbitrary bytes, started
//! from a checked-in corpus (`tests/corpus/`, plus `schemas/examples/`).
//!
//! Properties: neither parser panics; every error is bounded (it echoes at
//! most 1 KiB of input, plus its own words); a decoded job encodes back to a
//! body that decodes to the same job; an import line that parses becomes a
//! message the broker accepts, or a clear error.
//!
//! `HERALD_FUZZ_CASES` (default 100,000 per target) and `HERALD_FUZZ_SEED`
//! set the budget and replay a run: `HERALD_FUZZ_CASES=2000000 cargo test
//! --test it fuzz -- --nocapture`. A failure prints the input as hex.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use herald::dlq::Exported;
use herald::job::{Job, WireJob};

const MAX_ERROR: usize = 1024 + 256;

/// Fragments a mutation splices in: JSON structure, escapes, extremes.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-0",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\\u0000",
    b"\\ud800",
    b"\\\"",
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b"\"version\":1",
    b"\"organization_id\":",
    b"\"$timestamp\":",
    b"\"$bytes_hex\":\"zz\"",
    b"\"headers\":{",
    b"\"body_hex\":\"0\"",
    b"\"x-death\":[{",
    b"2026-13-45T99:99:99Z",
];

fn corpus(dirs: &[&str]) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = Vec::new();
    for dir in dirs {
        let mut paths: Vec<_> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            // An export file is one input per line.
            if path.extension().is_some_and(|e| e == "jsonl") {
                inputs.extend(bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec));
            } else {
                inputs.push(bytes);
            }
        }
    }
    assert!(!inputs.is_empty(), "an empty corpus in {dirs:?}");
    inputs
}

/// One random change (or a few) to `input`.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(..=out.len());
        match rng.u8(..8) {
            0 if !out.is_empty() => {
                let i = rng.usize(..out.len());
                out[i] ^= 1 << rng.u8(..8);
            }
            1 => out.insert(at, rng.u8(..)),
            2 if !out.is_empty() => {
                let end = (at + rng.usize(..16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 => out.splice(at..at, TOKENS[rng.usize(..TOKENS.len())].iter().copied()).for_each(drop),
            4 if !out.is_empty() => {
                // Repeat a slice: long values, deep nesting.
                let start = rng.usize(..out.len());
                let end = (start + rng.usize(1..32)).min(out.len());
                let piece = out[start..end].to_vec();
                for _ in 0..rng.usize(1..64) {
                    out.splice(start..start, piece.iter().copied()).for_each(drop);
                }
            }
            5 => {
                let other = &corpus[rng.usize(..corpus.len())];
                let from = rng.usize(..=other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            6 => out.truncate(at),
            _ => {
                let other = &corpus[rng.usize(..corpus.len())];
                let (a, b) = (rng.usize(..=other.len()), rng.usize(..=other.len()));
                out.splice(at..at, other[a.min(b)..a.max(b)].iter().copied()).for_each(drop);
            }
        }
    }
    out
}

/// Run `check` on the corpus and on `HERALD_FUZZ_CASES` mutations of it.
fn fuzz(target: &str, corpus: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let cases: usize = std::env::var("HERALD_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("HERALD_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261130);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pool = corpus.clone();
    for n in 0..corpus.len() + cases {
        let input = if n < corpus.len() {
            corpus[n].clone()
        } else {
            let parent = rng.usize(..pool.len());
            mutate(&mut rng, &pool[parent], &corpus)
        };
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input))) {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("{target}: case {n} (seed {seed}) failed on input (hex): {hex}");
            std::panic::resume_unwind(panic);
        }
        // Keep some mutants as parents, so that changes accumulate.
        if n >= corpus.len() && rng.u8(..16) == 0 && input.len() < 64 * 1024 {
            if pool.len() > 256 {
                pool.swap_remove(rng.usize(corpus.len()..pool.len()));
            }
            pool.push(input);
        }
    }
    eprintln!("{target}: {} inputs, seed {seed}", corpus.len() + cases);
}

#[test]
fn the_job_decoder_takes_any_bytes() {
    fuzz("job decoder", corpus(&["tests/corpus/job", "schemas/examples"]), |input| match Job::decode(input) {
        Ok(job) => {
            let again = serde_json::to_vec(&WireJob::from(&job)).unwrap();
            assert_eq!(Job::decode(&again).as_ref(), Ok(&job), "a decoded job encodes back to itself");
        }
        Err(err) => assert!(err.to_string().len() <= MAX_ERROR, "an error of {} bytes", err.to_string().len()),
    });
}

#[test]
fn the_dead_letter_import_parser_takes_any_bytes() {
    fuzz("dlq import", corpus(&["tests/corpus/dlq-import"]), |input| {
        let line = String::from_utf8_lossy(input);
        match Exported::parse(&line) {
            Ok(exported) => {
                if let Err(err) = exported.to_message() {
                    assert!(err.to_string().len() <= MAX_ERROR, "an error of {} bytes", err.to_string().len());
                }
            }
            Err(err) => assert!(err.to_string().len() <= MAX_ERROR, "an error of {} bytes", err.to_string().len()),
        }
    });
}

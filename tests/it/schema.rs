//! The JSON Schema and herald's own types agree on every example, so that the
//! documented contract and the worker can never drift apart.

use std::path::Path;

use herald::job::Job;

#[test]
fn every_example_gets_the_same_verdict_from_the_schema_and_from_herald() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("notification-job.v1.json")).unwrap()).unwrap();
    let validator = jsonschema::options().should_validate_formats(true).build(&schema).expect("the schema compiles");
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(root.join("examples")).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let instance: serde_json::Value = serde_json::from_str(&text).unwrap();
        let schema_says = validator.validate(&instance).map_err(|e| e.to_string());
        let herald_says = Job::decode(text.as_bytes()).map(drop).map_err(|e| e.to_string());
        let expected_valid = if name.starts_with("valid-") {
            true
        } else if name.starts_with("invalid-") {
            false
        } else {
            panic!("{name}: examples are named valid-* or invalid-*")
        };
        assert_eq!(schema_says.is_ok(), expected_valid, "{name}: the schema says {schema_says:?}");
        assert_eq!(herald_says.is_ok(), expected_valid, "{name}: herald says {herald_says:?}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} examples");
}

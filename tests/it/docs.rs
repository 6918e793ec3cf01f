//! Docs that cannot drift: every `herald ...` command line in README.md,
//! DEVELOPERS.md and docs/*.md parses against the real CLI, and every
//! setting, `HERALD_*` variable, metric and `x-herald-*` header the docs name
//! exists in the code.

use std::collections::BTreeSet;
use std::path::Path;

use clap::Parser;
use herald::cli::Cli;
use herald::settings::Settings;

fn documents() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = vec![root.join("README.md"), root.join("DEVELOPERS.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()).collect();
    docs.sort();
    paths.extend(docs.into_iter().filter(|p| p.extension().is_some_and(|e| e == "md")));
    paths.into_iter().map(|p| (p.strip_prefix(root).unwrap().display().to_string(), std::fs::read_to_string(&p).unwrap())).collect()
}

/// Split a shell line into words (single and double quotes; no expansion).
fn words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut started) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => (quote, started) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            (_, c) => (word, started) = (word + &c.to_string(), true),
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// Every `herald ...` command in the docs' code blocks and inline code,
/// continuation lines joined, comments and pipes cut off.
/// Each with whether it stood inline (a reference, maybe partial) rather
/// than in a code block (a full command line).
fn commands(text: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let candidates: Vec<String> =
            if in_block { vec![line.trim().to_owned()] } else { line.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
        for candidate in candidates {
            let joined = format!("{pending}{candidate}");
            if let Some(rest) = joined.strip_suffix('\\') {
                pending = rest.to_owned();
                continue;
            }
            pending.clear();
            let command = joined.trim_start_matches("$ ").trim();
            // `herald` and at least one word after it, the start of a shell line.
            let Some(after) = command.strip_prefix("herald ") else { continue };
            let cut = after.split(" # ").next().unwrap_or(after).split(" | ").next().unwrap_or(after);
            let cut = cut.split(" < ").next().unwrap_or(cut).split(" > ").next().unwrap_or(cut);
            found.push((format!("herald {}", cut.trim()), !in_block));
        }
    }
    found
}

#[test]
fn every_documented_command_line_parses() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, text) in documents() {
        for (command, inline) in commands(&text) {
            // Shorthand for several verbs at once ("dlq stats|list|...").
            if command.contains('|') {
                continue;
            }
            checked += 1;
            let mut args = words(&command);
            // A reference in running text may name a command without its
            // required flags: the command must exist.
            if inline && !command.contains(" --") {
                args.push("--help".into());
            }
            match Cli::try_parse_from(&args) {
                Ok(_) => {}
                Err(err) if err.kind() == clap::error::ErrorKind::DisplayHelp => {}
                Err(err) => {
                    let first = err.to_string().lines().next().unwrap_or_default().to_owned();
                    problems.push(format!("{file}: `{command}`: {first}"));
                }
            }
        }
    }
    assert!(checked >= 30, "only {checked} commands found in the docs");
    assert!(problems.is_empty(), "{} documented command(s) do not parse:\n{}", problems.len(), problems.join("\n"));
}

/// Words in backticks (or code blocks) that look like `prefix...`.
fn named(text: &str, starts: &str, allowed: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(starts) {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !allowed(c)).unwrap_or(tail.len());
        let word = tail[..end].trim_end_matches(['.', '_', '-']);
        if word.len() > starts.len() {
            found.insert(word.to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    found
}

#[test]
fn every_documented_setting_variable_metric_and_header_exists() {
    let figment = Settings::defaults();
    // `secrets.keys` is a map: its entries are the operator's key ids.
    let key_exists = |key: &str| figment.find_value(key).is_ok() || key.starts_with("secrets.keys.");
    let sections = ["worker.", "fleet.", "retry.", "teams.", "http.", "dlq.", "ledger.", "headers.", "secrets.", "telemetry.", "log."];
    let metrics_source =
        [include_str!("../../src/metrics.rs"), include_str!("../../src/http.rs"), include_str!("../../src/gateway/mod.rs")].concat();
    let headers_source = include_str!("../../src/rabbitmq/headers.rs");
    // Variables of the test suites and tools, not settings.
    let not_settings = [
        "HERALD_CONFIG",
        "HERALD_PROPERTY_JOBS",
        "HERALD_PROPERTY_SEED",
        "HERALD_HOSTILE_JOBS",
        "HERALD_HOSTILE_SEED",
        "HERALD_FUZZ_CASES",
        "HERALD_FUZZ_SEED",
        "HERALD_SOAK_JOBS",
        "HERALD_IT_RELEASE",
    ];
    let mut problems = Vec::new();
    for (file, text) in documents() {
        let keys = text
            .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.' || c == '<' || c == '>'))
            .map(|w| w.trim_end_matches('.'))
            .filter(|w| sections.iter().any(|s| w.starts_with(s) && w.len() > s.len()));
        for key in keys {
            // `teams.clouds.<cloud>.…` patterns and file names are not keys.
            if key.contains('<') || key.ends_with(".md") || key.ends_with(".rs") || key.ends_with(".toml") {
                continue;
            }
            if !key_exists(key) {
                problems.push(format!("{file}: setting `{key}` does not exist"));
            }
        }
        for var in named(&text, "HERALD_", |c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
            if not_settings.contains(&var.as_str()) {
                continue;
            }
            let key = var.trim_start_matches("HERALD_").to_lowercase().replace("__", ".");
            if !key_exists(&key) {
                problems.push(format!("{file}: variable {var} names no setting ({key})"));
            }
        }
        // `herald_keys` is a collection.
        for metric in named(&text, "herald_", |c| c.is_ascii_lowercase() || c == '_').into_iter().filter(|m| m != "herald_keys") {
            let base = metric.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
            if !metrics_source.contains(&format!("\"{base}")) {
                problems.push(format!("{file}: metric {metric} is not exported"));
            }
        }
        for header in named(&text, "x-herald-", |c| c.is_ascii_lowercase() || c == '-') {
            if !headers_source.contains(&format!("\"{header}\"")) {
                problems.push(format!("{file}: header {header} does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "{} name(s) in the docs do not exist:\n{}", problems.len(), problems.join("\n"));
}

/// GitHub's anchor of a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Where the alerts' runbook_url annotations point: this repository's docs.
const RUNBOOKS: &str = "https://github.com/herald/herald/blob/main/";

#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/herald-rules.yaml")).unwrap();
    let alerts = rules.matches("- alert:").count();
    let links: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("runbook_url:")).map(str::trim).collect();
    assert_eq!(links.len(), alerts, "every alert has a runbook_url");
    for url in links {
        let link = url.strip_prefix(RUNBOOKS).unwrap_or_else(|| panic!("{url}: runbooks live under {RUNBOOKS}"));
        let (file, anchor) = link.split_once('#').unwrap_or_else(|| panic!("{link}: link a section, not a whole page"));
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|_| panic!("{link}: no such file"));
        let anchors: BTreeSet<String> = text.lines().filter(|l| l.starts_with('#')).map(slug).collect();
        assert!(anchors.contains(anchor), "{link}: no such section in {file}");
    }
}

/// Every setting herald reads, as `docs/configuration.md` names it: the
/// clouds' tables as `teams.clouds.<cloud>.…`, the sealing key ring as
/// `secrets.keys.<id>`. Each with its default as TOML writes it.
fn settings_with_defaults() -> std::collections::BTreeMap<String, String> {
    fn literal(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) => format!("[{}]", items.iter().map(literal).collect::<Vec<_>>().join(", ")),
            other => other.to_string(),
        }
    }
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match value {
            serde_json::Value::Object(map) if prefix == "teams.clouds" => {
                for cloud in map.values() {
                    walk("teams.clouds.<cloud>", cloud, out);
                }
            }
            serde_json::Value::Object(_) if prefix == "secrets.keys" => {
                out.insert("secrets.keys.<id>".into(), String::new());
            }
            // The pacing windows are a list of tables: one setting each.
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    walk(&path, value, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), literal(leaf));
            }
        }
    }
    let defaults: serde_json::Value = Settings::defaults().extract().unwrap();
    let mut out = std::collections::BTreeMap::new();
    walk("", &defaults, &mut out);
    out
}

/// docs/configuration.md lists every setting once, no other, and each
/// default written as a literal there is the embedded default.
#[test]
fn the_configuration_reference_is_every_setting_with_its_default() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let settings = settings_with_defaults();
    let mut documented = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    for row in page.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").map(|c| c.trim_matches(|c| c == '|' || c == ' ')).collect();
        let key = cells[0].trim_matches('`').to_owned();
        if documented.insert(key.clone(), cells.get(1).copied().unwrap_or_default().to_owned()).is_some() {
            problems.push(format!("`{key}` is listed twice"));
        }
    }
    for (key, default) in &settings {
        match documented.get(key) {
            None => problems.push(format!("`{key}` is not documented")),
            Some(cell) if cell.starts_with('`') && cell.ends_with('`') && cell.trim_matches('`') != default => {
                problems.push(format!("`{key}`: the page says {cell}, the default is `{default}`"))
            }
            Some(_) => {}
        }
    }
    for key in documented.keys().filter(|k| !settings.contains_key(*k)) {
        problems.push(format!("`{key}` is documented but herald has no such setting"));
    }
    assert!(settings.len() > 50, "only {} settings found", settings.len());
    assert!(problems.is_empty(), "docs/configuration.md and the settings differ:\n{}", problems.join("\n"));
}

/// Every alert has a case in deploy/prometheus/herald-rules.test.yaml that
/// expects it to fire (`make lint` runs them with promtool).
#[test]
fn every_alert_has_a_promtool_test_that_makes_it_fire() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/herald-rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(root.join("deploy/prometheus/herald-rules.test.yaml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    // An `alertname:` followed by `exp_alerts:` with an entry, not `exp_alerts: []`.
    let fired: BTreeSet<&str> = lines
        .windows(3)
        .filter(|w| w[1] == "exp_alerts:" && w[2].starts_with("- exp_labels:"))
        .filter_map(|w| w[0].strip_prefix("alertname:").map(str::trim))
        .collect();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:").map(str::trim)).collect();
    assert!(alerts.len() >= 14, "{alerts:?}");
    let missing: Vec<&&str> = alerts.iter().filter(|a| !fired.contains(**a)).collect();
    assert!(missing.is_empty(), "alerts without a promtool test that makes them fire: {missing:?}");
}

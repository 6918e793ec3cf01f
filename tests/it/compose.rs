//! deploy/docker-compose.yml works as written, proven without Docker (this
//! machine has none): each herald service's command and environment are
//! read from the file and run as local processes, in the same order and with
//! the same settings, against the local RabbitMQ, MongoDB and a teams-sim
//! started with the compose file's own arguments. Only what Docker itself
//! provides is translated: service names become 127.0.0.1, mounted files
//! their paths in the repository, and the topology prefix and database are
//! this test's own so that it leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn compose() -> Value {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker-compose.yml");
    let script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let output = std::process::Command::new("python3").args(["-c", script]).arg(&file).output().expect("python3 runs");
    assert!(output.status.success(), "PyYAML reads the compose file: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

/// A mounted file or folder (`./demo/x:/container/path:ro`): (container path, repository path).
fn mounts(service: &Value) -> Vec<(String, PathBuf)> {
    strings(&service["volumes"])
        .iter()
        .map(|v| {
            let mut parts = v.split(':');
            let (host, container) = (parts.next().unwrap(), parts.next().unwrap());
            (container.to_owned(), Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(host.trim_start_matches("./")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_start_end_to_end_with_their_own_commands_and_settings() {
    let file = compose();
    let services = &file["services"];
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let dir = std::env::temp_dir().join(format!("herald-compose-{id}"));
    std::fs::create_dir_all(&dir).unwrap();

    // teams-sim, with the compose file's arguments and world.
    let sim_service = &services["teams-sim"];
    let mut sim_args = strings(&sim_service["command"]);
    for arg in sim_args.iter_mut() {
        if let Some((_, path)) = mounts(sim_service).into_iter().find(|(container, _)| container == arg) {
            *arg = path.display().to_string();
        }
        *arg = arg.replace("0.0.0.0:", "127.0.0.1:");
    }
    let sim_binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/teams-sim");
    assert!(sim_binary.exists(), "build the workspace's binaries first (make test does)");
    let mut sim = tokio::process::Command::new(&sim_binary).args(&sim_args).stdout(Stdio::null()).kill_on_drop(true).spawn().unwrap();
    let sim_client = teams_sim::client::SimClient::new("http://127.0.0.1:3978");
    eventually("teams-sim on 3978", Duration::from_secs(10), || async { sim_client.health().await.ok() }).await;

    let all_mounts: Vec<_> = ["herald-setup", "herald-seed", "herald-worker"].iter().flat_map(|s| mounts(&services[*s])).collect();
    // A setting that names a mounted path (secrets.directory) gets its repository path.
    let host_path = |value: &str| match all_mounts.iter().find(|(container, _)| container == value) {
        Some((_, host)) => host.display().to_string(),
        None => value.to_owned(),
    };
    let environment = |service: &Value| -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = service["environment"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (k.clone(), host_path(v.as_str().unwrap()).replace("@rabbitmq:", "@127.0.0.1:").replace("//mongodb:", "//127.0.0.1:"))
            })
            .collect();
        env.insert("HERALD_TOPOLOGY_PREFIX".into(), format!("compose-{id}"));
        env.insert("HERALD_MONGODB_DATABASE".into(), format!("compose_{id}"));
        env
    };
    let command = |name: &str, extra: &[&str]| {
        let service = &services[name];
        let mut args = strings(&service["command"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        // A mounted file is read at its path in the repository; a file that
        // names other mounted files gets their repository paths too.
        for arg in args.iter_mut() {
            if let Some((_, path)) = all_mounts.iter().find(|(container, _)| container == arg) {
                let mut text = std::fs::read_to_string(path).unwrap();
                for (container, host) in &all_mounts {
                    text = text.replace(container.as_str(), &host.display().to_string());
                }
                let copy = dir.join(path.file_name().unwrap());
                std::fs::write(&copy, text).unwrap();
                *arg = copy.display().to_string();
            }
        }
        let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        process.args(&args).env_clear().env("PATH", std::env::var("PATH").unwrap()).envs(environment(service)).kill_on_drop(true);
        process
    };

    // The order of depends_on: setup, then seed, then the workers.
    let setup = command("herald-setup", &[]).output().await.unwrap();
    assert!(setup.status.success(), "herald-setup: {}", stderr(&setup));
    let seed = command("herald-seed", &[]).output().await.unwrap();
    assert!(seed.status.success(), "herald-seed: {}{}", stdout(&seed), stderr(&seed));
    let replicas = services["herald-worker"]["deploy"]["replicas"].as_u64().unwrap();
    let workers: Vec<_> = (0..replicas).map(|_| command("herald-worker", &[]).stderr(Stdio::null()).spawn().unwrap()).collect();

    // The job the compose file's header shows (and one of the other
    // organization), published with the same settings.
    let enqueue = |org: &str, conversation: &str| {
        let mut publish = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        publish
            .args(["enqueue", "--org", org, "--integration", "teams-main", "--conversation", conversation, "--title", "Disk full"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .envs(environment(&services["herald-seed"]));
        publish
    };
    for (org, conversation) in [("acme", "19:acme-alerts@thread.tacv2"), ("globex", "19:globex-alerts@thread.tacv2")] {
        let out = enqueue(org, conversation).output().await.unwrap();
        assert!(out.status.success(), "enqueue: {}", stderr(&out));
    }

    let records = eventually("both jobs posted", Duration::from_secs(30), || async {
        let records = sim_client.all_activities().await.ok()?;
        (records.len() >= 2).then_some(records)
    })
    .await;
    let by_app: BTreeMap<_, _> = records.iter().map(|r| (r.app_id.as_str(), r.conversation_id.as_str())).collect();
    assert_eq!(by_app.get("acme-bot-app"), Some(&"19:acme-alerts@thread.tacv2"), "acme's secret came from the mounted file");
    assert_eq!(by_app.get("globex-bot-app"), Some(&"19:globex-alerts@thread.tacv2"), "globex's from the environment");

    for worker in workers {
        assert!(terminate(worker).await.success());
    }
    let _ = sim.kill().await;
    // Leave nothing behind: the queues and the database of this run.
    let settings = herald::settings::Settings::from_figment(
        herald::settings::Settings::defaults()
            .merge(figment::providers::Serialized::default("topology_prefix", format!("compose-{id}")))
            .merge(figment::providers::Serialized::default("mongodb_database", format!("compose_{id}"))),
    )
    .unwrap();
    let store = herald::mongo::Store::connect(&settings).await.unwrap();
    store.drop_database().await.unwrap();
    let connection = herald::rabbitmq::connect(AMQP_URL, "compose cleanup").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = herald::rabbitmq::Topology::from(&settings);
    for queue in topology.queues() {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    for exchange in topology.exchanges() {
        let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

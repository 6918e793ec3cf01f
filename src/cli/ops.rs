//! `herald seed` and `herald doctor`.

use std::process::ExitCode;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::mongo::{ConversationDoc, OrgIntegrationDoc, Store};
use crate::rabbitmq;
use crate::settings::{Settings, redact_url};

/// The file `herald seed` reads (docs/operations.md, "Onboard an
/// organization"; an example is deploy/demo/seed.json).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    org_integrations: Vec<OrgIntegrationDoc>,
    #[serde(default)]
    conversations: Vec<ConversationDoc>,
}

/// Load org_integrations and conversations: every record is checked with
/// the worker's own checks first, and nothing is written if one fails.
pub async fn seed(settings: &Settings, file: &std::path::Path, dry_run: bool, release_quarantined: bool, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut seed: SeedFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let teams = crate::teams::Teams::new(&settings.teams)?;
    let secrets = crate::secrets::Secrets::new(&settings.secrets)?;
    let mut problems = Vec::new();
    for (i, record) in seed.org_integrations.iter_mut().enumerate() {
        // A plaintext secret in the file is sealed for its record before
        // anything is written: MongoDB never holds it in the clear.
        if let Err(err) = secrets.seal_plaintext(record) {
            problems.push(format!("org_integrations[{i}]: bot.app_secret: {err}"));
            continue;
        }
        if let Err(problem) = crate::worker::resolve::check_record(record, &teams, &secrets) {
            problems.push(format!("org_integrations[{i}]: {problem}"));
        }
    }
    for (i, conversation) in seed.conversations.iter().enumerate() {
        let known = seed
            .org_integrations
            .iter()
            .any(|o| o.organization_id == conversation.organization_id && o.integration_id == conversation.integration_id);
        if conversation.conversation_id.trim().is_empty() {
            problems.push(format!("conversations[{i}]: blank conversation_id"));
        }
        if !known {
            println!(
                "note: conversations[{i}] belongs to {}/{}, which this file does not define (it must exist already)",
                conversation.organization_id, conversation.integration_id
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{} refused, nothing written:\n  {}", file.display(), problems.join("\n  "));
    }
    let (orgs, conversations) = (seed.org_integrations.len(), seed.conversations.len());
    if dry_run {
        match json {
            true => println!(
                "{}",
                serde_json::json!({ "valid": true, "org_integrations": orgs, "conversations": conversations, "written": false })
            ),
            false => println!(
                "{} is valid: would write {orgs} org_integration(s) and {conversations} conversation(s); nothing written",
                file.display()
            ),
        }
        return Ok(());
    }
    let store = Store::connect(settings).await?;
    store.ensure_indexes().await?;
    let report = store.seed(&seed.org_integrations, &seed.conversations, release_quarantined).await?;
    store.shutdown().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "seeded {orgs} org_integration(s) ({} new, {} replaced) and {conversations} conversation(s) ({} new, {} updated{})",
        report.org_integrations_created,
        report.org_integrations_updated,
        report.conversations_created,
        report.conversations_updated,
        if release_quarantined { ", quarantines lifted" } else { ", quarantines kept" }
    );
    Ok(())
}

/// `herald setup`: declare the topology and indexes; with `migrate`, rebuild
/// the queues whose arguments changed (and finish a rebuild that was
/// interrupted), keeping their messages. Without it, a queue with other
/// arguments is reported and left as it is (the workers use it as declared),
/// so that an init container running `herald setup` does not stop a rolling
/// upgrade; `herald doctor` fails until it is rebuilt.
pub async fn setup(settings: Settings, migrate: bool) -> anyhow::Result<ExitCode> {
    let connection = std::sync::Arc::new(rabbitmq::Broker::new(&settings).connect("herald setup").await?);
    let worker = crate::worker::Worker::build(settings, tokio_util::sync::CancellationToken::new()).await?;
    let declared = worker.setup(&connection).await?;
    let mut differing = Vec::new();
    for spec in worker.topology.specs() {
        if declared.kept.contains(&spec.name) || (migrate && rabbitmq::interrupted(&connection, &spec).await?) {
            differing.push(spec);
        }
    }
    if !migrate {
        for spec in &differing {
            eprintln!("queue {} exists with other arguments than these settings give it (it works as it was declared)", spec.name);
        }
        if !differing.is_empty() {
            eprintln!("stop the workers, then run `herald setup --migrate`: it rebuilds them and keeps their messages (docs/upgrading.md)");
        }
        differing.clear();
    }
    for spec in differing {
        let messages = rabbitmq::queue_status(&connection, &spec.name).await?.map_or(0, |(m, _)| m);
        let bar = super::progress(2 * u64::from(messages), &format!("rebuilding {}", spec.name));
        let rebuilt = rabbitmq::rebuild(connection.clone(), &spec, &|moved| bar.set_position(moved)).await?;
        bar.finish_and_clear();
        println!(
            "queue {} rebuilt with the settings' arguments: {} message(s) kept in order, {} published meanwhile moved in after them",
            spec.name, rebuilt.held, rebuilt.arrived
        );
    }
    println!("topology {} declared, MongoDB indexes ensured", worker.topology.prefix);
    let _ = connection.close(200, "done".into()).await;
    Ok(ExitCode::SUCCESS)
}

pub async fn doctor(settings: &Settings, json: bool, management_url: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut checks: Vec<serde_json::Value> = Vec::new();
    let mut check = |name: &str, result: Result<String, String>| {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        if !json {
            println!("{}  {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        }
        checks.push(serde_json::json!({ "check": name, "ok": ok, "detail": detail }));
    };
    check("settings", Ok(format!("prefix {}, database {}", settings.topology_prefix, settings.mongodb_database)));
    let amqp = crate::settings::redact_urls(&settings.amqp_url);
    match rabbitmq::Broker::new(settings).connect("herald doctor").await {
        Ok(connection) => {
            check("rabbitmq", Ok(format!("connected to {amqp}")));
            if let Some(tls) = amqp_tls(settings).await {
                check("rabbitmq tls", tls);
            }
            check("message size", message_size_limit(&connection, settings).await);
            let topology = crate::rabbitmq::Topology::from(settings);
            for spec in topology.specs() {
                let queue = &spec.name;
                let result = match crate::rabbitmq::queue_status(&connection, queue).await {
                    Ok(None) => Err("missing: run `herald setup`".to_owned()),
                    Ok(Some((messages, consumers))) => {
                        // It exists, so declaring it creates nothing: the
                        // broker only compares the arguments.
                        let mut channel = connection.create_channel().await?;
                        match spec.declare(&connection, &mut channel).await {
                            Ok(true) => Ok(format!("{messages} message(s), {consumers} consumer(s)")),
                            Ok(false) => Err(format!(
                                "{messages} message(s), {consumers} consumer(s); declared with other arguments than these \
                                 settings give it: stop the workers and run `herald setup --migrate` (docs/upgrading.md)"
                            )),
                            Err(err) => Err(crate::text::error_chain(&err)),
                        }
                    }
                    Err(err) => Err(crate::text::error_chain(&err)),
                };
                check(&format!("queue {queue}"), result);
            }
        }
        Err(err) => check("rabbitmq", Err(format!("{amqp}: {}", crate::text::error_chain(&err)))),
    }
    let mongo = redact_url(&settings.mongodb_uri);
    match Store::connect(settings).await {
        Ok(store) => {
            match store.ping().await {
                Ok(()) => {
                    check("mongodb", Ok(format!("{mongo} answers ping")));
                    if let Some(tls) = mongodb_tls(settings).await {
                        check("mongodb tls", tls);
                    }
                    let indexes = match store.missing_indexes().await {
                        Ok(missing) if missing.is_empty() => Ok("every index herald uses exists (retention included)".to_owned()),
                        Ok(missing) => Err(format!("missing {}: run `herald setup`", missing.join(", "))),
                        Err(err) => Err(crate::text::error_chain(&err)),
                    };
                    check("indexes", indexes);
                    check("bot secrets", bot_secrets(settings, &store).await);
                    let header_key = match crate::worker::tool_signer(settings, &store).await {
                        Ok(_) if settings.headers.signing_key.expose_secret().is_empty() => Ok("kept in MongoDB".to_owned()),
                        Ok(_) => Ok(format!("headers.signing_key, {} previous key(s)", settings.headers.previous_keys.len())),
                        Err(err) => Err(crate::text::error_chain(&err)),
                    };
                    check("header signing key", header_key);
                }
                Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
            }
            store.shutdown().await;
        }
        Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
    }
    let dead_queue = crate::rabbitmq::Topology::from(settings).dead_queue();
    match management_url {
        Some(url) => {
            let shown = crate::teams::redact(url);
            check("dead-letter policy", dead_letter_policy(url, &dead_queue).await.map_err(|why| format!("{shown}: {why}")));
        }
        None if !json => println!(
            "note  dead-letter policy not checked: pass --management-url (RabbitMQ 4.x needs one on {dead_queue}; \
             docs/operations.md, \"RabbitMQ 4 and the dead-letter queue\")"
        ),
        None => {}
    }
    let ok = checks.iter().all(|c| c["ok"] == true);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Whether the broker refuses a message one byte over
/// `worker.broker_max_message_bytes`, which bounds what the work queue's
/// consumer may hold (`WorkerSettings::intake_prefetch`). The probe goes to
/// the default exchange under a name no queue has: accepted, it is dropped.
async fn message_size_limit(connection: &lapin::Connection, settings: &Settings) -> Result<String, String> {
    use lapin::Confirmation;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let largest = settings.worker.broker_max_message_bytes;
    let prefetch = settings.worker.intake_prefetch();
    let probe = async {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let body = vec![0u8; usize::try_from(largest).unwrap_or(usize::MAX - 1) + 1];
        let properties = lapin::BasicProperties::default();
        let confirm = channel
            .basic_publish("".into(), "herald.doctor.message-size-probe".into(), BasicPublishOptions::default(), &body, properties)
            .await?
            .await;
        let _ = channel.close(200, "probe done".into()).await;
        confirm
    };
    let holds = format!(
        "RabbitMQ refuses messages over worker.broker_max_message_bytes ({largest}); the work queue's consumer takes {prefetch} at a \
         time, at most {} MiB",
        (u64::from(prefetch) * largest) >> 20
    );
    match tokio::time::timeout(std::time::Duration::from_secs(60), probe).await {
        Err(_) => Err("the probe message was neither accepted nor refused within 60 s".to_owned()),
        Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err("the broker nacked the probe message".to_owned()),
        Ok(Ok(Confirmation::Ack(_))) => Err(format!(
            "RabbitMQ accepted a message of {} bytes, over worker.broker_max_message_bytes, so the work queue's consumer may hold \
             {prefetch} messages of the broker's own limit: set max_message_size = {largest} in rabbitmq.conf, or raise the \
             setting to the broker's limit (docs/deploy.md, \"Message size and memory\")",
            largest + 1
        )),
        Ok(Err(err)) => {
            let text = crate::text::error_chain(&err);
            if text.contains("larger than configured max size") || text.contains("PRECONDITION_FAILED") {
                Ok(holds)
            } else {
                Err(format!("the probe failed: {text}"))
            }
        }
    }
}

/// The TLS the broker negotiates, for an `amqps://` URL.
async fn amqp_tls(settings: &Settings) -> Option<Result<String, String>> {
    let uri: lapin::uri::AMQPUri = crate::settings::amqp_urls(&settings.amqp_url).first()?.parse().ok()?;
    if uri.scheme != lapin::uri::AMQPScheme::AMQPS {
        return None;
    }
    let tls = &settings.amqp_tls;
    let path = |p: &str| (!p.is_empty()).then(|| p.to_owned());
    let trust = super::tls_probe::Trust { ca_file: path(&tls.ca_file), cert_file: path(&tls.cert_file), key_file: path(&tls.key_file) };
    Some(super::tls_probe::probe(uri.authority.host, uri.authority.port, trust).await)
}

/// The TLS MongoDB negotiates, when the URI turns TLS on.
async fn mongodb_tls(settings: &Settings) -> Option<Result<String, String>> {
    use mongodb::options::{ClientOptions, ServerAddress, Tls};
    let options = ClientOptions::parse(settings.mongodb_uri.expose_secret()).await.ok()?;
    let Some(Tls::Enabled(tls)) = options.tls else { return None };
    let ServerAddress::Tcp { host, port } = options.hosts.first()? else { return None };
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let both = path(&tls.cert_key_file_path);
    let trust = super::tls_probe::Trust { ca_file: path(&tls.ca_file_path), cert_file: both.clone(), key_file: both };
    Some(super::tls_probe::probe(host.clone(), port.unwrap_or(27017), trust).await)
}

/// Where the org_integrations' bot secrets (and webhook URLs) are, and
/// whether the worker would accept each (its scope, its key, plaintext),
/// without reading any.
async fn bot_secrets(settings: &Settings, store: &Store) -> Result<String, String> {
    let secrets = crate::secrets::Secrets::new(&settings.secrets).map_err(|err| err.to_string())?;
    let records = store.all_org_integrations().await.map_err(|err| crate::text::error_chain(&err))?;
    let current = secrets.keyring().sealing_key();
    let (mut sealed, mut older, mut referenced, mut plaintext, mut refused) = (0, 0, 0, 0, Vec::new());
    for doc in &records {
        if let Err(err) = secrets.check(doc) {
            refused.push(format!("{}/{}: {err}", doc.organization_id, doc.integration_id));
        }
        let seal = doc.workflow.as_ref().map(|w| &w.url_sealed).or(doc.bot.app_secret_sealed.as_ref());
        match (&doc.bot.app_secret, seal) {
            (Some(_), _) => plaintext += 1,
            (None, Some(seal)) if Some(seal.key_id.as_str()) == current => sealed += 1,
            (None, Some(_)) => older += 1,
            (None, None) => referenced += 1,
        }
    }
    let summary = format!(
        "{} org_integration(s): {sealed} sealed with the current key, {older} with another, {referenced} by reference, {plaintext} in plaintext",
        records.len()
    );
    match refused.first() {
        Some(first) => Err(format!("{summary}; {} refused by the worker, e.g. {first}", refused.len())),
        None if plaintext + older > 0 => Ok(format!("{summary} (herald org-integrations seal-secrets)")),
        None => Ok(summary),
    }
}

/// Whether the broker keeps every dead letter however often a tool looks at
/// it: on RabbitMQ 4.x, quorum queues get a default delivery limit of 20, so
/// the dead-letter queue needs a policy with `delivery-limit: -1`; on 3.x a
/// quorum queue without `x-delivery-limit` has none, and -1 would be harmful.
async fn dead_letter_policy(management_url: &str, dead_queue: &str) -> Result<String, String> {
    let url = url::Url::parse(management_url).map_err(|e| format!("not a URL: {e}"))?;
    let (user, password) = (url.username().to_owned(), url.password().unwrap_or_default().to_owned());
    let mut base = url.clone();
    let _ = base.set_username("");
    let _ = base.set_password(None);
    let vhost = match base.path().trim_matches('/') {
        "" => "%2F".to_owned(),
        path => path.to_owned(),
    };
    let root =
        format!("{}://{}", base.scheme(), base.host_str().unwrap_or_default()) + &base.port().map(|p| format!(":{p}")).unwrap_or_default();
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
    let get = |path: String| {
        let request = http.get(format!("{root}{path}")).basic_auth(&user, Some(&password));
        async move {
            let response = request.send().await.map_err(|e| crate::text::error_chain(&e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("the management API answered {status}"));
            }
            response.json::<serde_json::Value>().await.map_err(|e| crate::text::error_chain(&e))
        }
    };
    let overview = get("/api/overview".into()).await?;
    let version = overview["rabbitmq_version"].as_str().unwrap_or("unknown").to_owned();
    let policies = get(format!("/api/policies/{vhost}")).await?;
    policy_verdict(&version, &policies, dead_queue)
}

/// The policy check itself, on the management API's answers.
fn policy_verdict(version: &str, policies: &serde_json::Value, dead_queue: &str) -> Result<String, String> {
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    let lifting = policies.as_array().into_iter().flatten().find(|policy| {
        let applies = matches!(policy["apply-to"].as_str(), Some("quorum_queues" | "queues" | "all") | None);
        let matches = policy["pattern"].as_str().and_then(|p| regex::Regex::new(p).ok()).is_some_and(|re| re.is_match(dead_queue));
        applies && matches && policy["definition"]["delivery-limit"].as_i64() == Some(-1)
    });
    match (major >= 4, lifting) {
        (true, Some(policy)) => Ok(format!("RabbitMQ {version}: policy {} lifts the delivery limit of {dead_queue}", policy["name"])),
        (true, None) => Err(format!(
            "RabbitMQ {version} gives {dead_queue} a delivery limit of 20, so browsing could drop dead letters: \
             rabbitmqctl set_policy herald-dlq '^{}$' '{{\"delivery-limit\": -1}}' --apply-to quorum_queues",
            regex::escape(dead_queue)
        )),
        (false, Some(policy)) => Err(format!(
            "RabbitMQ {version}: policy {} sets delivery-limit -1 on {dead_queue}, which 3.x reads as \"drop at the first return\": remove it",
            policy["name"]
        )),
        (false, None) => Ok(format!("RabbitMQ {version}: {dead_queue} has no delivery limit (no policy needed before 4.0)")),
    }
}

#[cfg(test)]
mod tests {
    use super::policy_verdict;
    use serde_json::json;

    #[test]
    fn the_dead_letter_policy_is_required_on_4_and_harmful_on_3() {
        let queue = "herald.msteams.dead";
        let lifted = json!([{ "name": "herald-dlq", "pattern": "^herald\\.msteams\\.dead$", "apply-to": "quorum_queues", "definition": { "delivery-limit": -1 } }]);
        let other = json!([{ "name": "ha", "pattern": "^other$", "apply-to": "queues", "definition": { "delivery-limit": -1 } }]);
        assert!(policy_verdict("4.1.2", &lifted, queue).is_ok());
        let missing = policy_verdict("4.0.5", &other, queue).unwrap_err();
        assert!(missing.contains("set_policy herald-dlq '^herald\\.msteams\\.dead$'"), "{missing}");
        assert!(policy_verdict("3.13.1", &json!([]), queue).is_ok());
        assert!(policy_verdict("3.10.8", &lifted, queue).is_err());
    }
}

//! `herald org-integrations`: onboard, inspect, rotate, switch off and check
//! an organization's use of a Teams integration, with the worker's own
//! checks before anything is written. Secrets come from a file, an
//! environment variable's name or standard input, never from a flag value
//! (which would land in shell history).

use std::io::Read;

use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::{Usage, progress};
use crate::job::{Content, ConversationId, IntegrationId, Message, OrganizationId};
use crate::mongo::{BotDoc, IntegrationKind, IntegrationStatus, OrgIntegrationDoc, Store, WorkflowDoc};
use crate::secrets::{MAX_SECRET_BYTES, Owner, Resealed, Secrets};
use crate::settings::Settings;
use crate::teams::{Destination, Teams, card, redact};
use crate::text::error_chain;
use crate::worker::resolve;

#[derive(Debug, Subcommand)]
pub enum OrgIntegrationsCommand {
    /// Create an org_integration, or make an existing one what the flags say:
    /// a bot (--app-id, --service-url and a secret source) or, with --kind
    /// workflow_webhook, a Teams Workflows webhook (--url-file). Checked with
    /// the worker's own checks (cloud, service-URL or webhook-host allowlist,
    /// exactly one secret source) before anything is written.
    Add(Box<AddArgs>),
    /// List org_integrations (secrets never shown: only where each is kept).
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one org_integration (its secret's source, never its value).
    Show {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Rotate the bot secret (replace its source), or a webhook's URL
    /// (--url-file, sealed). Workers use it at their next resolution
    /// (worker.resolution_cache_ttl_secs).
    SetSecret {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Seal every bot secret and webhook URL stored in MongoDB with the
    /// current key (secrets.seal_with): plaintext `bot.app_secret` from
    /// before sealing, and secrets sealed with an older key after a key
    /// rotation. Each record
    /// is rewritten only if unchanged since it was read. Safe to re-run.
    SealSecrets {
        /// Count what would be sealed; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop deliveries: jobs are dead-lettered `org_integration_disabled`.
    Disable {
        #[command(flatten)]
        target: Target,
    },
    /// Resume deliveries after `disable`.
    Enable {
        #[command(flatten)]
        target: Target,
    },
    /// Remove an org_integration and its registered conversations.
    Remove {
        #[command(flatten)]
        target: Target,
        /// Confirm (required: this cannot be undone).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Check that an org_integration works: the record, its secret, a token
    /// from its cloud (a bot's) and, with --send-test, a test card (into
    /// --conversation for a bot; where its flow posts for a webhook). Nothing
    /// is posted without --send-test. Says exactly which step failed and why
    /// (exit 1).
    Check {
        #[command(flatten)]
        target: Target,
        /// Also post a test card.
        #[arg(long)]
        send_test: bool,
        /// A conversation registered for this org_integration (a bot's test
        /// card goes there).
        #[arg(long)]
        conversation: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// One org_integration.
#[derive(Debug, Args)]
pub struct Target {
    /// The organization.
    #[arg(long)]
    pub org: String,
    /// Its Teams integration.
    #[arg(long)]
    pub integration: String,
}

/// Where the bot's secret comes from (exactly one), or a webhook's URL.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct SecretArgs {
    /// The worker reads the secret from this environment variable (its name
    /// is stored): <secrets.env_prefix><organization>__<NAME>, e.g.
    /// TEAMS_BOT_SECRET_acme__MAIN.
    #[arg(long)]
    secret_env: Option<String>,
    /// The worker reads the secret from this file, e.g. a mounted Kubernetes
    /// secret (its path is stored): <secrets.directory>/<organization>/<NAME>.
    #[arg(long)]
    secret_file: Option<String>,
    /// Read the secret from standard input and store it in MongoDB, sealed
    /// with the key ring (secrets.keys).
    #[arg(long)]
    secret_stdin: bool,
    /// A Teams Workflows webhook's URL, read from this file (the whole URL,
    /// signature included: it is sealed with the key ring, never stored in
    /// the clear or shown).
    #[arg(long)]
    url_file: Option<std::path::PathBuf>,
}

/// How an org_integration reaches Teams, on the command line.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum KindArg {
    #[default]
    Bot,
    WorkflowWebhook,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// The organization's Microsoft 365 tenant id.
    #[arg(long)]
    tenant: String,
    /// A bot (the default), or a Teams Workflows webhook (--url-file).
    #[arg(long, value_enum, default_value_t)]
    kind: KindArg,
    /// The bot's Microsoft app id (a bot only).
    #[arg(long)]
    app_id: Option<String>,
    /// The tenant of a single-tenant bot (default: the cloud's multi-tenant authority).
    #[arg(long)]
    authority: Option<String>,
    /// The Microsoft cloud: a key of `teams.clouds` (public, gcc, gcch, dod).
    #[arg(long)]
    cloud: Option<String>,
    /// The Bot Connector service URL Teams gave for this tenant, e.g.
    /// https://smba.trafficmanager.net/emea/ (a bot only).
    #[arg(long)]
    service_url: Option<String>,
    #[command(flatten)]
    secret: SecretArgs,
    /// Store it disabled (no deliveries until `enable`).
    #[arg(long)]
    disabled: bool,
}

impl SecretArgs {
    /// The webhook URL of `--url-file`, sealed for the record of
    /// `organization_id` / `integration_id`.
    fn workflow(&self, secrets: &Secrets, organization_id: &str, integration_id: &str) -> anyhow::Result<WorkflowDoc> {
        let Some(path) = &self.url_file else {
            return Err(Usage("a workflow_webhook org_integration needs --url-file (its webhook URL)".into()).into());
        };
        if secrets.keyring().sealing_key().is_none() {
            return Err(Usage(format!("--url-file: {}", crate::secrets::SecretError::NoSealingKey)).into());
        }
        let mut url = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(crate::secrets::MAX_WORKFLOW_URL_BYTES as u64 + 1).read_to_string(&mut url))
            .map_err(|err| Usage(format!("--url-file {}: {err}", path.display())))?;
        let url = SecretString::from(url.trim().to_owned());
        let url_sealed = secrets
            .seal_workflow_url(organization_id, integration_id, &url)
            .map_err(|err| Usage(format!("--url-file {}: {err}", path.display())))?;
        Ok(WorkflowDoc { url_sealed })
    }

    /// The bot of `owner`'s record with this secret source; a secret from
    /// standard input is sealed for exactly that record.
    fn bot(&self, secrets: &Secrets, owner: Owner<'_>, authority: Option<String>) -> anyhow::Result<BotDoc> {
        if self.url_file.is_some() {
            return Err(
                Usage("--url-file is a Workflows webhook's URL; a bot takes --secret-env, --secret-file or --secret-stdin".into()).into()
            );
        }
        if self.secret_env.is_none() && self.secret_file.is_none() && !self.secret_stdin {
            return Err(Usage("a bot needs its secret: --secret-env, --secret-file or --secret-stdin".into()).into());
        }
        let app_id = owner.app_id;
        let mut bot = BotDoc {
            app_id: app_id.to_owned(),
            app_secret: None,
            app_secret_sealed: None,
            app_secret_env: None,
            app_secret_file: None,
            authority,
        };
        if self.secret_stdin {
            if secrets.keyring().sealing_key().is_none() {
                return Err(Usage(format!("--secret-stdin: {}", crate::secrets::SecretError::NoSealingKey)).into());
            }
            let mut secret = String::new();
            std::io::stdin().take(MAX_SECRET_BYTES as u64 + 1).read_to_string(&mut secret)?;
            let secret = SecretString::from(secret.trim().to_owned());
            if secret.expose_secret().is_empty() {
                return Err(Usage("--secret-stdin: standard input held no secret".into()).into());
            }
            bot = secrets.sealed_bot(owner, bot.authority, &secret).map_err(|err| Usage(format!("--secret-stdin: {err}")))?;
        } else {
            bot.app_secret_env = self.secret_env.clone();
            bot.app_secret_file = self.secret_file.clone();
        }
        Ok(bot)
    }
}

/// An org_integration as shown: the secret's source, never its value.
#[derive(Serialize)]
struct Shown {
    organization_id: String,
    integration_id: String,
    status: IntegrationStatus,
    tenant_id: String,
    cloud: String,
    kind: &'static str,
    service_url: String,
    app_id: String,
    authority: Option<String>,
    secret: String,
}

impl From<&OrgIntegrationDoc> for Shown {
    fn from(doc: &OrgIntegrationDoc) -> Self {
        let bot = &doc.bot;
        let secret = match (&bot.app_secret, &bot.app_secret_sealed, &bot.app_secret_env, &bot.app_secret_file) {
            _ if doc.kind == IntegrationKind::WorkflowWebhook => match &doc.workflow {
                Some(workflow) => format!("webhook URL sealed in MongoDB (key {})", workflow.url_sealed.key_id),
                None => "no webhook URL (misconfigured)".to_owned(),
            },
            (Some(_), None, None, None) => "plaintext in MongoDB (run seal-secrets)".to_owned(),
            (None, Some(sealed), None, None) => format!("sealed in MongoDB (key {})", sealed.key_id),
            (None, None, Some(var), None) => format!("env {var}"),
            (None, None, None, Some(path)) => format!("file {path}"),
            (None, None, None, None) => "none (misconfigured)".to_owned(),
            _ => "several sources (misconfigured)".to_owned(),
        };
        Self {
            organization_id: doc.organization_id.clone(),
            integration_id: doc.integration_id.clone(),
            status: doc.status,
            tenant_id: doc.tenant_id.clone(),
            cloud: doc.cloud.clone().unwrap_or_else(|| "public".into()),
            kind: doc.kind.as_str(),
            service_url: redact(&doc.service_url),
            app_id: bot.app_id.clone(),
            authority: bot.authority.clone(),
            secret,
        }
    }
}

/// One step of `check`.
#[derive(Serialize)]
struct Step {
    step: &'static str,
    ok: bool,
    detail: String,
}

pub async fn run(settings: &Settings, command: OrgIntegrationsCommand) -> anyhow::Result<()> {
    let store = Store::connect(settings).await?;
    let result = dispatch(settings, &store, command).await;
    store.shutdown().await;
    result
}

async fn dispatch(settings: &Settings, store: &Store, command: OrgIntegrationsCommand) -> anyhow::Result<()> {
    let ttl = settings.worker.resolution_cache_ttl_secs;
    let secrets = Secrets::new(&settings.secrets)?;
    match command {
        OrgIntegrationsCommand::Add(args) => add(settings, &secrets, store, *args).await?,
        OrgIntegrationsCommand::List { org, limit, json } => {
            let list: Vec<Shown> = store.list_org_integrations(org.as_deref(), limit).await?.iter().map(Shown::from).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<20} {:<9} {:<38} {:<16} {:<38} SECRET",
                "ORGANIZATION", "INTEGRATION", "STATUS", "TENANT", "KIND", "BOT APP"
            );
            for o in &list {
                let status = if o.status == IntegrationStatus::Active { "active" } else { "disabled" };
                let app = if o.app_id.is_empty() { "-" } else { o.app_id.as_str() };
                println!(
                    "{:<20} {:<20} {status:<9} {:<38} {:<16} {app:<38} {}",
                    o.organization_id, o.integration_id, o.tenant_id, o.kind, o.secret
                );
            }
            println!("{} org_integration(s)", list.len());
        }
        OrgIntegrationsCommand::Show { target, json } => {
            let shown = Shown::from(&find(store, &target).await?);
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                let value = serde_json::to_value(&shown)?;
                for (key, value) in value.as_object().into_iter().flatten() {
                    println!("{key:<16} {}", value.as_str().map_or_else(|| value.to_string(), str::to_owned));
                }
            }
        }
        OrgIntegrationsCommand::SetSecret { target, secret } => {
            let mut doc = find(store, &target).await?;
            match doc.kind {
                IntegrationKind::Bot => doc.bot = secret.bot(&secrets, Owner::of(&doc), doc.bot.authority.clone())?,
                IntegrationKind::WorkflowWebhook => doc.workflow = Some(secret.workflow(&secrets, &target.org, &target.integration)?),
            }
            checked(settings, &secrets, &doc)?;
            store.put_org_integration(&doc).await?;
            println!(
                "secret of {}/{} replaced ({}); workers use it within {ttl} s",
                target.org,
                target.integration,
                Shown::from(&doc).secret
            );
        }
        OrgIntegrationsCommand::SealSecrets { dry_run } => seal_secrets(store, &secrets, dry_run).await?,
        OrgIntegrationsCommand::Disable { target } => set_status(store, &target, IntegrationStatus::Disabled, ttl).await?,
        OrgIntegrationsCommand::Enable { target } => set_status(store, &target, IntegrationStatus::Active, ttl).await?,
        OrgIntegrationsCommand::Remove { target, yes } => {
            if !yes {
                return Err(Usage(format!("removing {}/{} cannot be undone: add --yes", target.org, target.integration)).into());
            }
            let (removed, conversations) = store.remove_org_integration(&target.org, &target.integration).await?;
            match removed {
                0 => println!("no org_integration {}/{}; nothing removed", target.org, target.integration),
                _ => println!("removed {}/{} and its {conversations} conversation(s)", target.org, target.integration),
            }
        }
        OrgIntegrationsCommand::Check { target, send_test, conversation, json } => {
            let conversation = match conversation {
                Some(id) => Some(ConversationId::parse(id).ok_or_else(|| Usage("--conversation must not be blank".into()))?),
                None => None,
            };
            let steps = check(settings, &secrets, store, &target, send_test, conversation).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&steps)?);
            } else {
                for step in &steps {
                    println!("{:<12} {:<6} {}", step.step, if step.ok { "ok" } else { "FAILED" }, step.detail);
                }
            }
            if let Some(failed) = steps.iter().find(|s| !s.ok) {
                anyhow::bail!("check of {}/{} failed at `{}`: {}", target.org, target.integration, failed.step, failed.detail);
            }
        }
    }
    Ok(())
}

async fn add(settings: &Settings, secrets: &Secrets, store: &Store, args: AddArgs) -> anyhow::Result<()> {
    let AddArgs { target, tenant, kind, app_id, authority, cloud, service_url, secret, disabled } = args;
    let mut doc = match kind {
        KindArg::Bot => {
            let (Some(app_id), Some(service_url)) = (app_id, service_url) else {
                return Err(Usage("a bot needs --app-id and --service-url (or --kind workflow_webhook with --url-file)".into()).into());
            };
            let bot = secret.bot(secrets, Owner::bot(&target.org, &target.integration, &app_id), authority)?;
            OrgIntegrationDoc::active(&target.org, &target.integration, &tenant, &service_url, bot)
        }
        KindArg::WorkflowWebhook => {
            if app_id.is_some() || service_url.is_some() || authority.is_some() {
                return Err(Usage("a workflow_webhook has no bot: drop --app-id, --service-url and --authority".into()).into());
            }
            let workflow = secret.workflow(secrets, &target.org, &target.integration)?;
            OrgIntegrationDoc::workflow_webhook(&target.org, &target.integration, &tenant, workflow.url_sealed)
        }
    };
    doc.cloud = cloud;
    if disabled {
        doc.status = IntegrationStatus::Disabled;
    }
    checked(settings, secrets, &doc)?;
    let existed = find(store, &target).await.is_ok();
    store.ensure_indexes().await?;
    store.put_org_integration(&doc).await?;
    let verb = if existed { "updated" } else { "added" };
    let via = match doc.kind {
        IntegrationKind::Bot => format!("bot {}", doc.bot.app_id),
        IntegrationKind::WorkflowWebhook => "Workflows webhook, URL sealed".to_owned(),
    };
    println!("{verb} org_integration {}/{} ({via}, tenant {tenant})", target.org, target.integration);
    println!("next: herald conversations add --org {} --integration {} --conversation '19:...'", target.org, target.integration);
    println!("      herald org-integrations check --org {} --integration {}", target.org, target.integration);
    Ok(())
}

/// The worker's own checks of a record, as a usage error.
fn checked(settings: &Settings, secrets: &Secrets, doc: &OrgIntegrationDoc) -> anyhow::Result<()> {
    let teams = Teams::new(&settings.teams)?;
    resolve::check_record(doc, &teams, secrets).map_err(|problem| Usage(format!("refused, nothing written: {problem}")).into())
}

/// `seal-secrets`: every record, one at a time, with a progress line.
async fn seal_secrets(store: &Store, secrets: &Secrets, dry_run: bool) -> anyhow::Result<()> {
    let Some(key) = secrets.keyring().sealing_key() else {
        return Err(Usage(crate::secrets::SecretError::NoSealingKey.to_string()).into());
    };
    let records = store.all_org_integrations().await?;
    let progress = progress(records.len() as u64, "sealing");
    let (mut sealed, mut current, mut changed, mut failed) = (0u64, 0u64, 0u64, Vec::new());
    for doc in &records {
        progress.inc(1);
        match secrets.resealed(doc) {
            Ok(None) => current += 1,
            Ok(Some(_)) if dry_run => sealed += 1,
            Ok(Some(resealed)) => {
                let replaced = match &resealed {
                    Resealed::Bot(bot) => store.replace_bot_if_unchanged(doc, bot).await?,
                    Resealed::Workflow(workflow) => store.replace_workflow_if_unchanged(doc, workflow).await?,
                };
                match replaced {
                    true => sealed += 1,
                    false => changed += 1,
                }
            }
            Err(err) => failed.push(format!("{}/{}: {err}", doc.organization_id, doc.integration_id)),
        }
    }
    progress.finish_and_clear();
    let verb = if dry_run { "would seal" } else { "sealed" };
    println!("{verb} {sealed} secret(s) with key {key}; {current} already current or not stored in MongoDB");
    if changed > 0 {
        println!("{changed} record(s) changed while this ran and were left as they are: run seal-secrets again");
    }
    if !failed.is_empty() {
        anyhow::bail!("{} record(s) could not be sealed:\n  {}", failed.len(), failed.join("\n  "));
    }
    Ok(())
}

async fn find(store: &Store, target: &Target) -> anyhow::Result<OrgIntegrationDoc> {
    let (Some(org), Some(integration)) = (OrganizationId::parse(target.org.clone()), IntegrationId::parse(target.integration.clone()))
    else {
        return Err(Usage("--org and --integration must not be blank".into()).into());
    };
    store
        .org_integration(&org, &integration)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no org_integration for organization {} and integration {}", target.org, target.integration))
}

async fn set_status(store: &Store, target: &Target, status: IntegrationStatus, ttl: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        store.set_org_integration_status(&target.org, &target.integration, status).await?,
        "no org_integration for organization {} and integration {}",
        target.org,
        target.integration
    );
    let now = if status == IntegrationStatus::Active { "active" } else { "disabled" };
    println!("{}/{} is {now}; workers see it within {ttl} s (worker.resolution_cache_ttl_secs)", target.org, target.integration);
    Ok(())
}

/// Each step as a job would take it, stopping at the first that fails.
async fn check(
    settings: &Settings,
    secrets: &Secrets,
    store: &Store,
    target: &Target,
    send_test: bool,
    conversation: Option<ConversationId>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut step = |step, result: Result<String, String>| {
        let ok = result.is_ok();
        steps.push(Step { step, ok, detail: result.unwrap_or_else(|e| e) });
        ok
    };
    let teams = match Teams::new(&settings.teams) {
        Ok(teams) => teams,
        Err(err) => {
            step("settings", Err(error_chain(&err)));
            return steps;
        }
    };
    let doc = match find(store, target).await {
        Ok(doc) => doc,
        Err(err) => {
            step("record", Err(format!("{err:#}")));
            return steps;
        }
    };
    let status_ok = match doc.status {
        IntegrationStatus::Active => Ok("found, active".to_owned()),
        IntegrationStatus::Disabled => Err("found, but disabled: jobs are dead-lettered org_integration_disabled".to_owned()),
    };
    if !step("record", status_ok)
        || !step(
            "structure",
            resolve::check_record(&doc, &teams, secrets).map(|()| "cloud, service URL and secret source valid".to_owned()),
        )
    {
        return steps;
    }
    let integration = match resolve::credentials(doc, &teams, secrets).await {
        Ok(integration) => integration,
        Err(problem) => {
            step("secret", Err(problem));
            return steps;
        }
    };
    let message = Message {
        title: "herald test".into(),
        text: format!("A test card from `herald org-integrations check` for {}/{}.", target.org, target.integration),
        url: None,
        severity: Default::default(),
        facts: Vec::new(),
    };
    let bot = match &integration.via {
        resolve::Via::Bot { bot, .. } => bot,
        resolve::Via::Workflow(workflow) => {
            step("secret", Ok(format!("webhook URL opened: {} (on the cloud's workflow_hosts)", workflow.shown())));
            if send_test {
                let sent = async {
                    let body = teams.encode(&card::activity(&Content::Message(message)))?;
                    teams.post_workflow(workflow, &body, tokio::time::Instant::now() + teams.request_timeout()).await
                };
                let detail = sent.await.map(|sent| format!("accepted by Workflows (run {})", sent.activity_id));
                step("send", detail.map_err(|err| error_chain(&err)));
            }
            return steps;
        }
    };
    step("secret", Ok("read".to_owned()));
    let token = teams.fetch_token(bot).await.map(|()| format!("accepted by the {} cloud", bot.cloud()));
    if !step("token", token.map_err(|err| error_chain(&err))) {
        return steps;
    }
    if !send_test {
        return steps;
    }
    let Some(conversation) = conversation else {
        step("conversation", Err("--send-test needs --conversation for a bot (a conversation registered for it)".to_owned()));
        return steps;
    };
    let registered = store.conversation(&integration.organization_id, &integration.integration_id, &conversation).await;
    match registered {
        Ok(Some(c)) if c.status == crate::mongo::ConversationStatus::Active => {}
        Ok(Some(_)) => {
            step(
                "conversation",
                Err(format!("{} is quarantined for this org_integration (herald conversations list)", conversation.as_str())),
            );
            return steps;
        }
        Ok(None) => {
            step(
                "conversation",
                Err(format!("{} is not registered for this org_integration (herald conversations add)", conversation.as_str())),
            );
            return steps;
        }
        Err(err) => {
            step("conversation", Err(error_chain(&err)));
            return steps;
        }
    }
    step("conversation", Ok("registered, active".to_owned()));
    let sent = async {
        let service_url = integration.checked_service_url()?;
        let body = teams.encode(&card::activity(&Content::Message(message)))?;
        let to = Destination { service_url: &service_url, conversation_id: conversation.as_str(), bot };
        teams.send(&to, &body, tokio::time::Instant::now() + teams.request_timeout()).await
    };
    step("send", sent.await.map(|sent| format!("posted, activity {}", sent.activity_id)).map_err(|err| error_chain(&err)));
    steps
}

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
use crate::mongo::{BotDoc, IntegrationStatus, OrgIntegrationDoc, Store};
use crate::secrets::{MAX_SECRET_BYTES, Owner, Secrets};
use crate::settings::Settings;
use crate::teams::{Destination, Teams, card, redact};
use crate::text::error_chain;
use crate::worker::resolve;

#[derive(Debug, Subcommand)]
pub enum OrgIntegrationsCommand {
    /// Create an org_integration, or make an existing one what the flags say.
    /// Checked with the worker's own checks (cloud, service-URL allowlist,
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
    /// Rotate the bot secret: replace the secret source. Workers use it at
    /// their next resolution (worker.resolution_cache_ttl_secs).
    SetSecret {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Seal every bot secret stored in MongoDB with the current key
    /// (secrets.seal_with): plaintext `bot.app_secret` from before sealing,
    /// and secrets sealed with an older key after a key rotation. Each record
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
    /// from its cloud and, with --send-test, a test card in a conversation.
    /// Says exactly which step failed and why (exit 1).
    Check {
        #[command(flatten)]
        target: Target,
        /// Also post a test card into --conversation.
        #[arg(long, requires = "conversation")]
        send_test: bool,
        /// A conversation registered for this org_integration.
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

/// Where the bot's secret comes from: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
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
}

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    target: Target,
    /// The organization's Microsoft 365 tenant id.
    #[arg(long)]
    tenant: String,
    /// The bot's Microsoft app id.
    #[arg(long)]
    app_id: String,
    /// The tenant of a single-tenant bot (default: the cloud's multi-tenant authority).
    #[arg(long)]
    authority: Option<String>,
    /// The Microsoft cloud: a key of `teams.clouds` (public, gcc, gcch, dod).
    #[arg(long)]
    cloud: Option<String>,
    /// The Bot Connector service URL Teams gave for this tenant, e.g. https://smba.trafficmanager.net/emea/.
    #[arg(long)]
    service_url: String,
    #[command(flatten)]
    secret: SecretArgs,
    /// Store it disabled (no deliveries until `enable`).
    #[arg(long)]
    disabled: bool,
}

impl SecretArgs {
    /// The bot of `owner`'s record with this secret source; a secret from
    /// standard input is sealed for exactly that record.
    fn bot(&self, secrets: &Secrets, owner: Owner<'_>, authority: Option<String>) -> anyhow::Result<BotDoc> {
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
    service_url: String,
    app_id: String,
    authority: Option<String>,
    secret: String,
}

impl From<&OrgIntegrationDoc> for Shown {
    fn from(doc: &OrgIntegrationDoc) -> Self {
        let bot = &doc.bot;
        let secret = match (&bot.app_secret, &bot.app_secret_sealed, &bot.app_secret_env, &bot.app_secret_file) {
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
            println!("{:<20} {:<20} {:<9} {:<38} {:<38} SECRET", "ORGANIZATION", "INTEGRATION", "STATUS", "TENANT", "BOT APP");
            for o in &list {
                let status = if o.status == IntegrationStatus::Active { "active" } else { "disabled" };
                println!(
                    "{:<20} {:<20} {status:<9} {:<38} {:<38} {}",
                    o.organization_id, o.integration_id, o.tenant_id, o.app_id, o.secret
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
            doc.bot = secret.bot(&secrets, Owner::of(&doc), doc.bot.authority.clone())?;
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
            let conversation = match conversation.filter(|_| send_test) {
                Some(id) => Some(ConversationId::parse(id).ok_or_else(|| Usage("--conversation must not be blank".into()))?),
                None => None,
            };
            let steps = check(settings, &secrets, store, &target, conversation).await;
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
    let AddArgs { target, tenant, app_id, authority, cloud, service_url, secret, disabled } = args;
    let owner = Owner { organization_id: &target.org, integration_id: &target.integration, app_id: &app_id };
    let bot = secret.bot(secrets, owner, authority)?;
    let mut doc = OrgIntegrationDoc::active(&target.org, &target.integration, &tenant, &service_url, bot);
    doc.cloud = cloud;
    if disabled {
        doc.status = IntegrationStatus::Disabled;
    }
    checked(settings, secrets, &doc)?;
    let existed = find(store, &target).await.is_ok();
    store.ensure_indexes().await?;
    store.put_org_integration(&doc).await?;
    let verb = if existed { "updated" } else { "added" };
    println!("{verb} org_integration {}/{} (bot {app_id}, tenant {tenant})", target.org, target.integration);
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
            Ok(Some(bot)) => match store.replace_bot_if_unchanged(doc, &bot).await? {
                true => sealed += 1,
                false => changed += 1,
            },
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
async fn check(settings: &Settings, secrets: &Secrets, store: &Store, target: &Target, conversation: Option<ConversationId>) -> Vec<Step> {
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
    step("secret", Ok("read".to_owned()));
    let token = teams.fetch_token(&integration.bot).await.map(|()| format!("accepted by the {} cloud", integration.bot.cloud()));
    if !step("token", token.map_err(|err| error_chain(&err))) {
        return steps;
    }
    let Some(conversation) = conversation else { return steps };
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
    let message = Message {
        title: "herald test".into(),
        text: format!("A test card from `herald org-integrations check` for {}/{}.", target.org, target.integration),
        url: None,
        severity: Default::default(),
        facts: Vec::new(),
    };
    let sent = async {
        let service_url = integration.checked_service_url()?;
        let body = teams.encode(&card::activity(&Content::Message(message)))?;
        let to = Destination { service_url: &service_url, conversation_id: conversation.as_str(), bot: &integration.bot };
        teams.send(&to, &body, tokio::time::Instant::now() + teams.request_timeout()).await
    };
    step("send", sent.await.map(|sent| format!("posted, activity {}", sent.activity_id)).map_err(|err| error_chain(&err)));
    steps
}

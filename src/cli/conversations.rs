//! `herald conversations`: see, quarantine and release conversations.

use clap::{Args, Subcommand};

use super::Usage;
use crate::job::{IntegrationId, OrganizationId};
use crate::mongo::{ConversationDoc, ConversationFilter, ConversationKind, ConversationStatus, Store};
use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum ConversationsCommand {
    /// List registered conversations (quarantined ones with their reason).
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        integration: Option<String>,
        /// Only `active` or `quarantined` conversations.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Register a conversation for an org_integration, so that its jobs may
    /// be sent there. Safe to repeat (a quarantine is kept).
    Add {
        #[command(flatten)]
        target: Target,
        /// channel, group or personal.
        #[arg(long, default_value = "channel")]
        kind: String,
        /// The user of a personal chat (required with --kind personal).
        #[arg(long)]
        user: Option<String>,
    },
    /// Unregister a conversation: its jobs are refused (recipient_not_in_organization).
    Remove {
        #[command(flatten)]
        target: Target,
    },
    /// Stop deliveries to a conversation of an org_integration.
    Quarantine {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "operator")]
        reason: String,
    },
    /// Lift a quarantine (after re-adding the bot to the team, for example).
    Release {
        #[command(flatten)]
        target: Target,
    },
    /// Activities from Teams (`herald gateway`) that named no single
    /// org_integration of their bot in their tenant, newest first.
    Unclaimed {
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Register an unclaimed conversation for the org_integration that owns
    /// it: refused unless that org_integration's bot and tenant are the
    /// ones Teams named; the conversation's unclaimed activities are then
    /// cleared.
    Claim {
        #[command(flatten)]
        target: Target,
    },
}

/// One conversation of one org_integration.
#[derive(Debug, Args)]
pub struct Target {
    /// The organization.
    #[arg(long)]
    org: String,
    /// Its Teams integration.
    #[arg(long)]
    integration: String,
    /// The conversation id, e.g. 19:...@thread.tacv2.
    #[arg(long)]
    conversation: String,
}

pub async fn run(settings: &Settings, command: ConversationsCommand) -> anyhow::Result<()> {
    let store = Store::connect(settings).await?;
    let ttl = settings.worker.resolution_cache_ttl_secs;
    match command {
        ConversationsCommand::List { org, integration, status, limit, json } => {
            let status = match status.as_deref() {
                None => None,
                Some("active") => Some(ConversationStatus::Active),
                Some("quarantined") => Some(ConversationStatus::Quarantined),
                Some(other) => anyhow::bail!("--status must be active or quarantined, not {other:?}"),
            };
            let filter = ConversationFilter { organization_id: org, integration_id: integration, status };
            let list = store.list_conversations(&filter, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!("{:<16} {:<16} {:<40} {:<9} {:<12} REASON", "ORGANIZATION", "INTEGRATION", "CONVERSATION", "KIND", "STATUS");
            for c in &list {
                let reason = c
                    .quarantine
                    .as_ref()
                    .map(|q| format!("{} {} since {}", q.reason, q.teams_code.as_deref().unwrap_or(""), q.at))
                    .unwrap_or_default();
                let status = if c.status == ConversationStatus::Active { "active" } else { "quarantined" };
                println!(
                    "{:<16} {:<16} {:<40} {:<9} {:<12} {reason}",
                    c.organization_id,
                    c.integration_id,
                    c.conversation_id,
                    format!("{:?}", c.kind).to_lowercase(),
                    status
                );
            }
            println!("{} conversation(s)", list.len());
        }
        ConversationsCommand::Add { target: Target { org, integration, conversation }, kind, user } => {
            let kind = match (kind.as_str(), &user) {
                ("channel", None) => ConversationKind::Channel,
                ("group", None) => ConversationKind::Group,
                ("personal", Some(_)) => ConversationKind::Personal,
                ("personal", None) => return Err(Usage("--kind personal needs --user".into()).into()),
                ("channel" | "group", Some(_)) => return Err(Usage("--user is only for --kind personal".into()).into()),
                (other, _) => return Err(Usage(format!("--kind must be channel, group or personal, not {other:?}")).into()),
            };
            anyhow::ensure!(!conversation.trim().is_empty(), Usage("--conversation must not be blank".into()));
            let (Some(org_id), Some(integration_id)) = (OrganizationId::parse(org.clone()), IntegrationId::parse(integration.clone()))
            else {
                return Err(Usage("--org and --integration must not be blank".into()).into());
            };
            anyhow::ensure!(
                store.org_integration(&org_id, &integration_id).await?.is_some(),
                "no org_integration for organization {org} and integration {integration}: add it first (herald org-integrations add)"
            );
            let doc = ConversationDoc { kind, user_id: user, ..ConversationDoc::channel(&org, &integration, &conversation) };
            store.put_conversation(&doc).await?;
            println!("registered {conversation} for {org}/{integration}; workers send to it within {ttl} s");
        }
        ConversationsCommand::Remove { target: Target { org, integration, conversation } } => {
            match store.remove_conversation(&org, &integration, &conversation).await? {
                true => println!("removed {conversation} from {org}/{integration}; its jobs are refused within {ttl} s"),
                false => println!("{conversation} was not registered for {org}/{integration}; nothing removed"),
            }
        }
        ConversationsCommand::Quarantine { target: Target { org, integration, conversation }, reason } => {
            anyhow::ensure!(
                store.quarantine(&org, &integration, &conversation, &reason, None).await?,
                "no conversation {conversation} for organization {org} and integration {integration}"
            );
            println!(
                "quarantined {conversation} for {org}/{integration}; workers stop sending to it within {ttl} s (worker.resolution_cache_ttl_secs)"
            );
        }
        ConversationsCommand::Unclaimed { limit, json } => {
            let list = store.unclaimed(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<40} {:<38} {:<38} {:<24} MATCHED", "CONVERSATION", "BOT APP", "TENANT", "ACTIVITY");
                for u in &list {
                    let activity = u.event.clone().unwrap_or_else(|| u.activity_type.clone());
                    println!("{:<40} {:<38} {:<38} {activity:<24} {}", u.conversation_id, u.app_id, u.tenant_id, u.matched);
                }
                println!(
                    "{} unclaimed activit(ies); `herald conversations claim` registers one for the org_integration that owns it",
                    list.len()
                );
            }
        }
        ConversationsCommand::Claim { target: Target { org, integration, conversation } } => {
            let (Some(org_id), Some(integration_id)) = (OrganizationId::parse(org.clone()), IntegrationId::parse(integration.clone()))
            else {
                return Err(Usage("--org and --integration must not be blank".into()).into());
            };
            let Some(owner) = store.org_integration(&org_id, &integration_id).await? else {
                anyhow::bail!("no org_integration for organization {org} and integration {integration}")
            };
            let named = store.unclaimed_of(&conversation).await?;
            anyhow::ensure!(!named.is_empty(), "no unclaimed activity names {conversation}");
            let fits = named.iter().any(|u| u.app_id == owner.bot.app_id && u.tenant_id == owner.tenant_id);
            anyhow::ensure!(
                fits,
                "refused: Teams named {conversation} for bot {} in tenant {}, not {org}/{integration}'s bot {} in tenant {}",
                named[0].app_id,
                named[0].tenant_id,
                owner.bot.app_id,
                owner.tenant_id
            );
            store.put_conversation(&ConversationDoc::channel(&org, &integration, &conversation)).await?;
            let cleared = store.clear_unclaimed(&conversation).await?;
            println!("registered {conversation} for {org}/{integration}; {cleared} unclaimed activit(ies) cleared");
        }
        ConversationsCommand::Release { target: Target { org, integration, conversation } } => {
            let Some(found) = store.release(&org, &integration, &conversation).await? else {
                anyhow::bail!("no conversation {conversation} for organization {org} and integration {integration}")
            };
            println!("released {conversation} for {org}/{integration}; workers send to it again within {ttl} s");
            if let Some(q) = found.quarantine {
                println!("it was quarantined for {} ({}) since {}", q.reason, q.teams_code.as_deref().unwrap_or("-"), q.at);
            }
            println!("its parked dead letters can now be replayed:");
            let target = format!("--org {org} --integration {integration} --conversation '{conversation}'");
            println!("  herald dlq list   {target} --reason conversation_quarantined");
            println!("  herald dlq replay {target} --reason conversation_quarantined --yes");
            println!("  herald dlq replay {target} --reason teams_forbidden --yes");
        }
    }
    Ok(())
}

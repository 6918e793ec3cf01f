//! The simulator's world: tenants, bot apps, users and conversations.
//!
//! Loaded from a JSON fixture at start (`teams-sim --world FILE`) and changed at
//! run time through the admin API. The fixture format is documented in
//! `docs/teams-sim.md`.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// The authority a multi-tenant bot requests its tokens from.
pub const MULTI_TENANT_AUTHORITY: &str = "botframework.com";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct World {
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    #[serde(default)]
    pub bots: Vec<Bot>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub conversations: Vec<Conversation>,
    /// Teams Workflows webhooks (flows that post a card into a chat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workflows: Vec<Workflow>,
}

/// A Teams Workflows flow triggered by a webhook: `POST
/// /powerautomate/automations/direct/workflows/{id}/triggers/manual/paths/invoke?...&sig={sig}`
/// posts the card into `conversation_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    pub id: String,
    /// The signature the URL must carry.
    pub sig: String,
    pub tenant_id: String,
    /// Where the flow posts its card (it need not be a conversation of the
    /// world: the flow's owner chose it).
    pub conversation_id: String,
    /// The flow is turned off: its trigger answers 404, as a deleted one.
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    pub app_id: String,
    pub app_secret: String,
    /// `botframework.com` for a multi-tenant bot, the home tenant id for a
    /// single-tenant one.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// A tenant admin blocked the app: every send answers 403 `BotDisabledByAdmin`.
    #[serde(default)]
    pub disabled: bool,
}

fn default_authority() -> String {
    MULTI_TENANT_AUTHORITY.to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    pub tenant_id: String,
    /// Bot apps installed in the user's personal scope: only these may create a
    /// 1:1 conversation with the user.
    #[serde(default)]
    pub installed_apps: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    #[default]
    Channel,
    Personal,
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Conversation {
    pub id: String,
    pub tenant_id: String,
    #[serde(default)]
    pub kind: ConversationKind,
    /// Bot app ids that are members of the conversation.
    #[serde(default)]
    pub roster: BTreeSet<String>,
    /// The user blocked the bot (personal chats): 403 `ConversationBlockedByUser`.
    #[serde(default)]
    pub blocked: bool,
    /// The user of a personal conversation.
    #[serde(default)]
    pub user_id: Option<String>,
}

/// The world indexed for lookups on the request path.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub tenants: HashMap<String, Tenant>,
    pub bots: HashMap<String, Bot>,
    pub users: HashMap<String, User>,
    pub conversations: HashMap<String, Conversation>,
    pub workflows: HashMap<String, Workflow>,
}

impl Index {
    pub fn from_world(world: World) -> Self {
        Self {
            tenants: world.tenants.into_iter().map(|t| (t.id.clone(), t)).collect(),
            bots: world.bots.into_iter().map(|b| (b.app_id.clone(), b)).collect(),
            users: world.users.into_iter().map(|u| (u.id.clone(), u)).collect(),
            conversations: world.conversations.into_iter().map(|c| (c.id.clone(), c)).collect(),
            workflows: world.workflows.into_iter().map(|w| (w.id.clone(), w)).collect(),
        }
    }

    /// The world back as a fixture, sorted so that it diffs well.
    pub fn to_world(&self) -> World {
        fn sorted<T: Clone>(map: &HashMap<String, T>) -> Vec<T> {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            keys.into_iter().map(|k| map[k].clone()).collect()
        }
        World {
            tenants: sorted(&self.tenants),
            bots: sorted(&self.bots),
            users: sorted(&self.users),
            conversations: sorted(&self.conversations),
            workflows: sorted(&self.workflows),
        }
    }

    /// The personal conversation between `user_id` and `app_id`, if one exists.
    pub fn personal_conversation(&self, user_id: &str, app_id: &str) -> Option<&Conversation> {
        self.conversations
            .values()
            .find(|c| c.kind == ConversationKind::Personal && c.user_id.as_deref() == Some(user_id) && c.roster.contains(app_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_round_trips_and_defaults_apply() {
        let json = r#"{
            "tenants": [{"id": "t1"}],
            "bots": [{"app_id": "a1", "app_secret": "s"}],
            "conversations": [{"id": "19:c@thread.tacv2", "tenant_id": "t1", "roster": ["a1"]}]
        }"#;
        let world: World = serde_json::from_str(json).unwrap();
        assert_eq!(world.bots[0].authority, MULTI_TENANT_AUTHORITY);
        assert_eq!(world.conversations[0].kind, ConversationKind::Channel);
        let back = Index::from_world(world.clone()).to_world();
        assert_eq!(back, world);
    }

    #[test]
    fn unknown_fixture_fields_are_refused() {
        let err = serde_json::from_str::<World>(r#"{"bots": [{"app_id": "a", "app_secret": "s", "secret": 1}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}

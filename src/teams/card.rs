//! Rendering a job's content as a Bot Framework message activity.
//!
//! Typed and borrowed from the job: the activity is written straight to the
//! request body, with no intermediate `serde_json::Value` per job.

use serde::Serialize;
use serde_json::Value;

use crate::job::{Content, Fact, Message, Severity};

pub const ADAPTIVE_CARD: &str = "application/vnd.microsoft.card.adaptive";

/// The activity posted to the conversation.
#[derive(Debug, Serialize)]
pub struct Activity<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    attachments: [Attachment<'a>; 1],
}

#[derive(Debug, Serialize)]
struct Attachment<'a> {
    #[serde(rename = "contentType")]
    content_type: &'static str,
    content: Card<'a>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Card<'a> {
    Rendered(AdaptiveCard<'a>),
    /// A card the producer built: posted unchanged.
    Ready(&'a Value),
}

#[derive(Debug, Serialize)]
struct AdaptiveCard<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "$schema")]
    schema: &'static str,
    version: &'static str,
    body: Vec<Element<'a>>,
    msteams: Width,
    #[serde(skip_serializing_if = "Option::is_none")]
    actions: Option<[OpenUrl<'a>; 1]>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type")]
enum Element<'a> {
    TextBlock {
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        weight: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<&'static str>,
        wrap: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        color: Option<&'static str>,
    },
    FactSet {
        facts: Vec<FactView<'a>>,
    },
}

#[derive(Debug, Serialize)]
struct FactView<'a> {
    title: &'a str,
    value: &'a str,
}

impl<'a> From<&'a Fact> for FactView<'a> {
    fn from(fact: &'a Fact) -> Self {
        Self { title: &fact.name, value: &fact.value }
    }
}

#[derive(Debug, Serialize)]
struct Width {
    width: &'static str,
}

#[derive(Debug, Serialize)]
struct OpenUrl<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    url: &'a str,
}

/// The activity posted to the conversation.
pub fn activity(content: &Content) -> Activity<'_> {
    let (summary, card) = match content {
        Content::Message(message) => (Some(summary(message)), Card::Rendered(render(message))),
        Content::Card(card) => (None, Card::Ready(card)),
    };
    Activity { kind: "message", summary, attachments: [Attachment { content_type: ADAPTIVE_CARD, content: card }] }
}

fn summary(message: &Message) -> String {
    if message.title.is_empty() { message.text.chars().take(120).collect() } else { message.title.clone() }
}

fn color(severity: Severity) -> &'static str {
    match severity {
        Severity::Info => "Accent",
        Severity::Warning => "Warning",
        Severity::Error | Severity::Critical => "Attention",
    }
}

/// An Adaptive Card 1.4: title, text, facts and an "Open" action.
fn render(message: &Message) -> AdaptiveCard<'_> {
    let mut body = Vec::with_capacity(3);
    if !message.title.is_empty() {
        body.push(Element::TextBlock {
            text: &message.title,
            weight: Some("Bolder"),
            size: Some("Medium"),
            wrap: true,
            color: Some(color(message.severity)),
        });
    }
    if !message.text.is_empty() {
        body.push(Element::TextBlock { text: &message.text, weight: None, size: None, wrap: true, color: None });
    }
    if !message.facts.is_empty() {
        body.push(Element::FactSet { facts: message.facts.iter().map(FactView::from).collect() });
    }
    AdaptiveCard {
        kind: "AdaptiveCard",
        schema: "http://adaptivecards.io/schemas/adaptive-card.json",
        version: "1.4",
        body,
        msteams: Width { width: "Full" },
        actions: message.url.as_ref().map(|url| [OpenUrl { kind: "Action.OpenUrl", title: "Open", url: url.as_str() }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_becomes_an_adaptive_card_activity() {
        let message = Message {
            title: "Disk full".into(),
            text: "/var at 99%".into(),
            url: Some("https://status.example.com/i/1".parse().unwrap()),
            severity: Severity::Critical,
            facts: vec![Fact { name: "host".into(), value: "db-1".into() }],
        };
        let activity = serde_json::to_value(activity(&Content::Message(message))).unwrap();
        assert_eq!(activity["type"], "message");
        assert_eq!(activity["summary"], "Disk full");
        let card = &activity["attachments"][0];
        assert_eq!(card["contentType"], ADAPTIVE_CARD);
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        assert_eq!(card["content"]["version"], "1.4");
        assert_eq!(card["content"]["body"][0]["color"], "Attention");
        assert_eq!(card["content"]["body"][2]["facts"][0]["value"], "db-1");
        assert_eq!(card["content"]["actions"][0]["url"], "https://status.example.com/i/1");
    }

    #[test]
    fn a_ready_card_is_posted_unchanged() {
        let card = json!({"type": "AdaptiveCard", "version": "1.5", "body": [{"type": "TextBlock", "text": "x"}]});
        let content = Content::Card(card.clone());
        let activity = serde_json::to_value(activity(&content)).unwrap();
        assert_eq!(activity["attachments"][0]["content"], card);
        assert!(activity.get("summary").is_none());
    }
}

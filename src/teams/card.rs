//! Rendering a job's content as a Bot Framework message activity.

use serde_json::{Value, json};

use crate::job::{Content, Message, Severity};

pub const ADAPTIVE_CARD: &str = "application/vnd.microsoft.card.adaptive";

/// The activity posted to the conversation.
pub fn activity(content: &Content) -> Value {
    let (summary, card) = match content {
        Content::Message(message) => (Some(summary(message)), render(message)),
        Content::Card(card) => (None, card.clone()),
    };
    let mut activity = json!({
        "type": "message",
        "attachments": [{ "contentType": ADAPTIVE_CARD, "content": card }],
    });
    if let Some(summary) = summary {
        activity["summary"] = Value::String(summary);
    }
    activity
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
pub fn render(message: &Message) -> Value {
    let mut body = Vec::new();
    if !message.title.is_empty() {
        body.push(json!({
            "type": "TextBlock", "text": message.title, "weight": "Bolder", "size": "Medium",
            "wrap": true, "color": color(message.severity),
        }));
    }
    if !message.text.is_empty() {
        body.push(json!({ "type": "TextBlock", "text": message.text, "wrap": true }));
    }
    if !message.facts.is_empty() {
        let facts: Vec<Value> = message.facts.iter().map(|f| json!({ "title": f.name, "value": f.value })).collect();
        body.push(json!({ "type": "FactSet", "facts": facts }));
    }
    let mut card = json!({
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4",
        "body": body,
        "msteams": { "width": "Full" },
    });
    if let Some(url) = &message.url {
        card["actions"] = json!([{ "type": "Action.OpenUrl", "title": "Open", "url": url.as_str() }]);
    }
    card
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Fact;

    #[test]
    fn a_message_becomes_an_adaptive_card_activity() {
        let message = Message {
            title: "Disk full".into(),
            text: "/var at 99%".into(),
            url: Some("https://status.example.com/i/1".parse().unwrap()),
            severity: Severity::Critical,
            facts: vec![Fact { name: "host".into(), value: "db-1".into() }],
        };
        let activity = activity(&Content::Message(message));
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
        let activity = activity(&Content::Card(card.clone()));
        assert_eq!(activity["attachments"][0]["content"], card);
        assert!(activity.get("summary").is_none());
    }
}

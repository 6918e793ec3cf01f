//! The client-credentials token request of the bench's side workers
//! (`naive`, `floor`): what a team's own worker would send to the identity
//! platform (here teams-sim's token endpoint).

use anyhow::Context;
use serde_json::Value;

/// The access token of bot app `app_id` from `endpoint`.
pub async fn fetch(http: &reqwest::Client, endpoint: &str, app_id: &str, app_secret: &str) -> anyhow::Result<String> {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", app_id),
        ("client_secret", app_secret),
        ("scope", "https://api.botframework.com/.default"),
    ];
    let answer: Value = http.post(format!("{endpoint}/botframework.com/oauth2/v2.0/token")).form(&form).send().await?.json().await?;
    Ok(answer["access_token"].as_str().context("no token")?.to_owned())
}

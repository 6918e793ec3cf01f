//! teams-sim as the Bot Framework's token service for a bot's messaging
//! endpoint: Teams signs every activity it sends a bot (a JWT in the
//! `Authorization` header), and publishes its keys in OpenID metadata with
//! the channels each key may sign for (`endorsements`). The simulator signs
//! with its own RSA key, which is public by design (`signing-key.pem`): it
//! authenticates nothing outside tests.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Sim;

/// The issuer of the Bot Framework's tokens to bots (public cloud).
pub const ISSUER: &str = "https://api.botframework.com";
/// The id of the simulator's signing key.
pub const KEY_ID: &str = "teams-sim-1";
const PRIVATE_KEY: &[u8] = include_bytes!("signing-key.pem");
/// The key's modulus and exponent, base64url (RFC 7518 §6.3.1).
const MODULUS: &str = "wd6_SzMdJ9DSaE75_RXSK0aZ46x9kIeTESVVFTM--KvPIIbLOCxRoL8iDfS_TIUzokqi0FNlWGNZ6jDGxOv8ua_NYZwOUkJ8_8JoP438SWEBeLtRvhv_VyBRmpAIHdTh8Q6Kk-Ek3ysA8cVzJCMSc303qmTmFZxoTdcIesI4td40jEYYhuKDSAsEoRbmF0dxFJxnMK18LpeTIcIxJxLDiCw_qJtLnq0hOTkVr_0d5xWbUQCcdXjhJMNXvD4gOEJz1RjLHnm-CNJ4qywkDHX54SUPHi3KI1-u2NohaUh1baNYXthH4JigN2B4gUbt2hL5Yb8HdI1oZM70i6zFH-Peqw";
const EXPONENT: &str = "AQAB";

/// What a test asks the simulator to sign: the claims Teams puts in the
/// token of an activity sent to bot `app_id` from `service_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SignRequest {
    /// The bot the activity goes to: the token's audience.
    pub app_id: String,
    /// The `serviceUrl` claim.
    pub service_url: String,
    /// Seconds from now until the token expires (default 3600; negative:
    /// expired already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<i64>,
    /// Another issuer than [`ISSUER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    exp: i64,
    nbf: i64,
    iat: i64,
    #[serde(rename = "serviceUrl")]
    service_url: &'a str,
}

/// A token for `request`, signed RS256 with the simulator's key.
pub fn sign(request: &SignRequest) -> String {
    let now = chrono::Utc::now().timestamp();
    let exp = now + request.expires_in_secs.unwrap_or(3600);
    let claims = Claims {
        iss: request.issuer.as_deref().unwrap_or(ISSUER),
        aud: &request.app_id,
        exp,
        nbf: now.min(exp) - 300,
        iat: now.min(exp) - 300,
        service_url: &request.service_url,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(KEY_ID.to_owned());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(PRIVATE_KEY).expect("the simulator's key is a valid RSA key");
    jsonwebtoken::encode(&header, &claims, &key).expect("claims of strings and numbers always encode")
}

/// `GET /v1/.well-known/openidconfiguration`: where the keys are.
pub(crate) async fn openid_configuration(headers: HeaderMap) -> Json<Value> {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    Json(json!({
        "issuer": ISSUER,
        "authorization_endpoint": "https://invalid.botframework.com",
        "jwks_uri": format!("http://{host}/v1/.well-known/keys"),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    }))
}

/// `GET /v1/.well-known/keys`: the signing key, endorsed for Teams.
pub(crate) async fn keys(State(sim): State<Sim>) -> Json<Value> {
    sim.lock().stats.key_fetches += 1;
    Json(json!({ "keys": [{
        "kty": "RSA", "use": "sig", "kid": KEY_ID, "n": MODULUS, "e": EXPONENT,
        "endorsements": ["msteams"],
    }]}))
}

/// `POST /_admin/sign`: a token for a test to send with an activity.
pub(crate) async fn sign_route(Json(request): Json<SignRequest>) -> Json<Value> {
    Json(json!({ "token": sign(&request) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_key_verifies_what_the_simulator_signs() {
        let token = sign(&SignRequest { app_id: "app".into(), service_url: "https://smba.example/".into(), ..Default::default() });
        let key = jsonwebtoken::DecodingKey::from_rsa_components(MODULUS, EXPONENT).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&["app"]);
        validation.set_issuer(&[ISSUER]);
        let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["serviceUrl"], "https://smba.example/");
        assert_eq!(data.header.kid.as_deref(), Some(KEY_ID));
    }
}

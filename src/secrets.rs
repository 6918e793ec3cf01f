//! Bot secrets: where an org_integration's secret may come from, and the key
//! ring that seals the ones stored in MongoDB (docs/tenancy.md, "Secrets").
//!
//! An org_integration is written by its organization's admin, so everything it
//! names is confined to that organization:
//! - `bot.app_secret_sealed`: AES-256-GCM under a key of `secrets.keys`, with
//!   the record's organization, integration and bot app id as associated data:
//!   a sealed secret copied into another organization's record does not open.
//! - `bot.app_secret_env`: only `<secrets.env_prefix><organization_id>__<NAME>`.
//! - `bot.app_secret_file`: only `<secrets.directory>/<organization_id>/<NAME>`,
//!   a regular file of at most [`MAX_SECRET_BYTES`], read off the runtime's
//!   threads with a deadline.
//! - `bot.app_secret` (plaintext) only while `secrets.accept_plaintext` is on
//!   (a migration: `herald org-integrations seal-secrets`).

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::{ExposeSecret, SecretString};

use crate::mongo::{BotDoc, IntegrationKind, OrgIntegrationDoc, SealedSecret, WorkflowDoc};
use crate::settings::SecretSettings;

/// The largest secret read from a file or opened from a seal. A bot secret is
/// tens of bytes; anything near this is not one (or is `/dev/zero`).
pub const MAX_SECRET_BYTES: usize = 16 * 1024;

/// How long reading a secret file may take (a hung network mount).
const FILE_DEADLINE: Duration = Duration::from_secs(5);

/// Domain separation of the associated data, versioned with the format: a
/// bot secret and a webhook URL never open as each other.
const AAD_CONTEXT: &[u8] = b"herald/bot-secret/v1";
const WORKFLOW_AAD_CONTEXT: &[u8] = b"herald/workflow-url/v1";

/// The longest Workflows webhook URL herald stores (they are a few hundred
/// bytes: host, workflow id, API version and signature).
pub const MAX_WORKFLOW_URL_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("bot has no secret (one of app_secret_sealed, app_secret_env, app_secret_file)")]
    NoSource,
    #[error("bot must have exactly one of app_secret_sealed, app_secret_env, app_secret_file (and app_secret while migrating)")]
    SeveralSources,
    #[error(
        "bot.app_secret is stored in plaintext, which is refused: seal it with `herald org-integrations seal-secrets` (secrets.accept_plaintext allows it during a migration)"
    )]
    Plaintext,
    #[error("bot.app_secret_sealed was sealed with key {key_id:?}, which is not in secrets.keys")]
    UnknownKey { key_id: String },
    #[error(
        "bot.app_secret_sealed does not open with key {key_id:?} for this organization, integration and bot app (sealed for another record, or altered)"
    )]
    DoesNotOpen { key_id: String },
    #[error("bot.app_secret_sealed is malformed: {0}")]
    Malformed(&'static str),
    #[error("no key to seal with: set secrets.keys (and secrets.seal_with when there are several)")]
    NoSealingKey,
    #[error("organization id {0:?} cannot name a secret variable or file (letters, digits, '.', '-', single '_'; not ending in '_')")]
    OrganizationNotReferable(String),
    #[error("bot.app_secret_env {var:?} is not this organization's: it must start with {scope:?} (secrets.env_prefix)")]
    EnvOutOfScope { var: String, scope: String },
    #[error("environment variable {0} (bot.app_secret_env) is not set")]
    EnvUnset(String),
    #[error("bot.app_secret_file is refused: secrets.directory is empty, so file references are off")]
    FilesOff,
    #[error("bot.app_secret_file {path:?} is not this organization's: it must be a file name directly under {scope:?} (secrets.directory)")]
    FileOutOfScope { path: String, scope: String },
    #[error("cannot read bot.app_secret_file {path}: {source}")]
    FileUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bot.app_secret_file {0} is not a regular file")]
    NotARegularFile(String),
    #[error("the bot secret from {0} is larger than {MAX_SECRET_BYTES} bytes: not a bot secret")]
    TooLarge(String),
    #[error("reading bot.app_secret_file {0} took longer than {FILE_DEADLINE:?}")]
    FileTimedOut(String),
    #[error("the bot secret is empty")]
    Empty,
    #[error("{0}")]
    Keyring(String),
    #[error("a workflow_webhook record needs `workflow.url_sealed` and no `bot` (herald org-integrations add --kind workflow_webhook)")]
    WorkflowShape,
    #[error("a bot record has no `workflow` (kind: bot)")]
    BotShape,
    #[error("the webhook URL is not a URL herald can post to: {0}")]
    WorkflowUrl(String),
}

/// What a sealed secret is bound to: the record it was sealed for.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub organization_id: &'a str,
    pub integration_id: &'a str,
    /// The bot app id; empty for a webhook URL.
    pub app_id: &'a str,
    context: &'static [u8],
}

impl<'a> Owner<'a> {
    /// The owner of a bot secret.
    pub fn bot(organization_id: &'a str, integration_id: &'a str, app_id: &'a str) -> Self {
        Self { organization_id, integration_id, app_id, context: AAD_CONTEXT }
    }

    /// The owner of a webhook URL.
    pub fn workflow(organization_id: &'a str, integration_id: &'a str) -> Self {
        Self { organization_id, integration_id, app_id: "", context: WORKFLOW_AAD_CONTEXT }
    }

    /// The owner of the record's bot secret.
    pub fn of(doc: &'a OrgIntegrationDoc) -> Self {
        Self::bot(&doc.organization_id, &doc.integration_id, &doc.bot.app_id)
    }

    /// Length-prefixed, so that no two owners give the same bytes.
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = self.context.to_vec();
        for part in [self.organization_id, self.integration_id, self.app_id] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }
}

/// The operator's sealing keys: open with any, seal with one.
pub struct Keyring {
    keys: BTreeMap<String, LessSafeKey>,
    seal_with: Option<String>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("keys", &self.keys.keys().collect::<Vec<_>>()).field("seal_with", &self.seal_with).finish()
    }
}

impl Keyring {
    pub fn from_settings(settings: &SecretSettings) -> Result<Self, SecretError> {
        let mut keys = BTreeMap::new();
        for (id, encoded) in &settings.keys {
            if id.is_empty() || id.len() > 32 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
                return Err(SecretError::Keyring(format!("key id {id:?}: 1 to 32 letters, digits, '-' or '_'")));
            }
            let bytes = BASE64
                .decode(encoded.expose_secret().trim())
                .map_err(|_| SecretError::Keyring(format!("key {id:?} is not base64 (openssl rand -base64 32)")))?;
            let key = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| SecretError::Keyring(format!("key {id:?} is {} bytes; AES-256 needs 32", bytes.len())))?;
            keys.insert(id.clone(), LessSafeKey::new(key));
        }
        let seal_with = match settings.seal_with.as_str() {
            "" if keys.len() == 1 => keys.keys().next().cloned(),
            "" => None,
            id if keys.contains_key(id) => Some(id.to_owned()),
            id => return Err(SecretError::Keyring(format!("secrets.seal_with {id:?} is not a key of secrets.keys"))),
        };
        if seal_with.is_none() && keys.len() > 1 {
            return Err(SecretError::Keyring("several keys: secrets.seal_with must name the one new seals use".into()));
        }
        Ok(Self { keys, seal_with })
    }

    /// The key id new seals use, if the ring has one.
    pub fn sealing_key(&self) -> Option<&str> {
        self.seal_with.as_deref()
    }

    pub fn seal(&self, owner: Owner<'_>, secret: &SecretString) -> Result<SealedSecret, SecretError> {
        let key_id = self.seal_with.as_ref().ok_or(SecretError::NoSealingKey)?;
        let key = &self.keys[key_id];
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SecretError::Keyring("the system's random source failed".into()))?;
        let mut sealed = secret.expose_secret().as_bytes().to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(owner.associated_data()), &mut sealed)
            .map_err(|_| SecretError::Keyring("sealing failed".into()))?;
        Ok(SealedSecret { key_id: key_id.clone(), nonce: BASE64.encode(nonce), ciphertext: BASE64.encode(sealed) })
    }

    pub fn open(&self, owner: Owner<'_>, sealed: &SealedSecret) -> Result<SecretString, SecretError> {
        let key = self.keys.get(&sealed.key_id).ok_or_else(|| SecretError::UnknownKey { key_id: sealed.key_id.clone() })?;
        let nonce = BASE64.decode(&sealed.nonce).map_err(|_| SecretError::Malformed("nonce is not base64"))?;
        let nonce = Nonce::try_assume_unique_for_key(&nonce).map_err(|_| SecretError::Malformed("nonce is not 12 bytes"))?;
        if sealed.ciphertext.len() > 2 * MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge("bot.app_secret_sealed".into()));
        }
        let mut buffer = BASE64.decode(&sealed.ciphertext).map_err(|_| SecretError::Malformed("ciphertext is not base64"))?;
        let plain = key
            .open_in_place(nonce, Aad::from(owner.associated_data()), &mut buffer)
            .map_err(|_| SecretError::DoesNotOpen { key_id: sealed.key_id.clone() })?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Malformed("the secret is not UTF-8"))?;
        Ok(SecretString::from(text))
    }
}

/// Where a record's secret comes from, once checked.
enum Source<'a> {
    Plaintext(&'a str),
    Sealed(&'a SealedSecret),
    Env(&'a str),
    File(&'a str),
}

/// The rules of [the module](self), from `secrets.*`.
#[derive(Debug)]
pub struct Secrets {
    keyring: Keyring,
    accept_plaintext: bool,
    env_prefix: String,
    directory: Option<String>,
}

impl Secrets {
    pub fn new(settings: &SecretSettings) -> Result<Self, SecretError> {
        Ok(Self {
            keyring: Keyring::from_settings(settings)?,
            accept_plaintext: settings.accept_plaintext,
            env_prefix: settings.env_prefix.clone(),
            directory: Some(settings.directory.trim_end_matches('/').to_owned()).filter(|d| !d.is_empty()),
        })
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Everything about the record's secret that can be known without
    /// reading it: one source, in this organization's scope (a bot's), or a
    /// sealed URL with a key of the ring and no bot (a webhook's).
    pub fn check(&self, doc: &OrgIntegrationDoc) -> Result<(), SecretError> {
        match doc.kind {
            IntegrationKind::Bot if doc.workflow.is_some() => Err(SecretError::BotShape),
            IntegrationKind::Bot => self.source(doc).map(drop),
            IntegrationKind::WorkflowWebhook => self.workflow_seal(doc).map(drop),
        }
    }

    fn workflow_seal<'a>(&self, doc: &'a OrgIntegrationDoc) -> Result<&'a SealedSecret, SecretError> {
        let (Some(workflow), true) = (&doc.workflow, doc.bot.is_unset()) else { return Err(SecretError::WorkflowShape) };
        if !self.keyring.keys.contains_key(&workflow.url_sealed.key_id) {
            return Err(SecretError::UnknownKey { key_id: workflow.url_sealed.key_id.clone() });
        }
        Ok(&workflow.url_sealed)
    }

    /// A webhook record's URL, opened (never logged: it carries the flow's
    /// signature).
    pub fn workflow_url(&self, doc: &OrgIntegrationDoc) -> Result<SecretString, SecretError> {
        let sealed = self.workflow_seal(doc)?;
        let url = self.keyring.open(Owner::workflow(&doc.organization_id, &doc.integration_id), sealed)?;
        if url.expose_secret().len() > MAX_WORKFLOW_URL_BYTES {
            return Err(SecretError::TooLarge("workflow.url_sealed".into()));
        }
        Ok(url)
    }

    /// `url` sealed for the webhook record of `organization_id` /
    /// `integration_id`.
    pub fn seal_workflow_url(&self, organization_id: &str, integration_id: &str, url: &SecretString) -> Result<SealedSecret, SecretError> {
        let text = url.expose_secret().trim();
        if text.is_empty() {
            return Err(SecretError::Empty);
        }
        if text.len() > MAX_WORKFLOW_URL_BYTES {
            return Err(SecretError::TooLarge("the webhook URL".into()));
        }
        self.keyring.seal(Owner::workflow(organization_id, integration_id), &SecretString::from(text.to_owned()))
    }

    fn source<'a>(&self, doc: &'a OrgIntegrationDoc) -> Result<Source<'a>, SecretError> {
        let bot = &doc.bot;
        let source = match (&bot.app_secret, &bot.app_secret_sealed, &bot.app_secret_env, &bot.app_secret_file) {
            (Some(plain), None, None, None) if self.accept_plaintext => Source::Plaintext(plain),
            (Some(_), None, None, None) => return Err(SecretError::Plaintext),
            (None, Some(sealed), None, None) => {
                if !self.keyring.keys.contains_key(&sealed.key_id) {
                    return Err(SecretError::UnknownKey { key_id: sealed.key_id.clone() });
                }
                Source::Sealed(sealed)
            }
            (None, None, Some(var), None) => {
                let scope = format!("{}{}__", self.env_prefix, referable(&doc.organization_id)?);
                match var.strip_prefix(&scope) {
                    Some(name) if plain_name(name) => Source::Env(var),
                    _ => return Err(SecretError::EnvOutOfScope { var: crate::text::clip(var, 256), scope }),
                }
            }
            (None, None, None, Some(path)) => {
                let directory = self.directory.as_ref().ok_or(SecretError::FilesOff)?;
                let scope = format!("{directory}/{}/", referable(&doc.organization_id)?);
                match path.strip_prefix(&scope) {
                    Some(name) if plain_name(name) => Source::File(path),
                    _ => return Err(SecretError::FileOutOfScope { path: crate::text::clip(path, 256), scope }),
                }
            }
            (None, None, None, None) => return Err(SecretError::NoSource),
            _ => return Err(SecretError::SeveralSources),
        };
        Ok(source)
    }

    /// The record's secret, by the rules above. A file is read on a blocking
    /// thread, at most [`MAX_SECRET_BYTES`] of it, within [`FILE_DEADLINE`].
    pub async fn read(&self, doc: &OrgIntegrationDoc) -> Result<SecretString, SecretError> {
        let secret = match self.source(doc)? {
            Source::Plaintext(plain) => SecretString::from(plain.to_owned()),
            Source::Sealed(sealed) => self.keyring.open(Owner::of(doc), sealed)?,
            Source::Env(var) => SecretString::from(std::env::var(var).map_err(|_| SecretError::EnvUnset(var.to_owned()))?),
            Source::File(path) => {
                let owned = path.to_owned();
                let read = tokio::task::spawn_blocking(move || read_bounded(&owned));
                match tokio::time::timeout(FILE_DEADLINE, read).await {
                    Ok(Ok(result)) => SecretString::from(result?.trim().to_owned()),
                    Ok(Err(_)) => {
                        return Err(SecretError::FileUnreadable {
                            path: path.to_owned(),
                            source: std::io::Error::other("reader panicked"),
                        });
                    }
                    Err(_) => return Err(SecretError::FileTimedOut(path.to_owned())),
                }
            }
        };
        if secret.expose_secret().trim().is_empty() {
            return Err(SecretError::Empty);
        }
        if secret.expose_secret().len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge("bot secret".into()));
        }
        Ok(secret)
    }

    /// `bot` with `secret` sealed for `owner` in place of any other source.
    pub fn sealed_bot(&self, owner: Owner<'_>, authority: Option<String>, secret: &SecretString) -> Result<BotDoc, SecretError> {
        if secret.expose_secret().trim().is_empty() {
            return Err(SecretError::Empty);
        }
        if secret.expose_secret().len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge("the new secret".into()));
        }
        let sealed = self.keyring.seal(owner, secret)?;
        Ok(BotDoc {
            app_id: owner.app_id.to_owned(),
            app_secret: None,
            app_secret_sealed: Some(sealed),
            app_secret_env: None,
            app_secret_file: None,
            authority,
        })
    }

    /// Seal the record's plaintext `bot.app_secret`, if it has one, in place
    /// (`herald seed`, and tools that store records as herald does).
    pub fn seal_plaintext(&self, doc: &mut OrgIntegrationDoc) -> Result<(), SecretError> {
        let Some(plain) = doc.bot.app_secret.take() else { return Ok(()) };
        let sealed = self.sealed_bot(Owner::of(doc), doc.bot.authority.clone(), &SecretString::from(plain))?;
        doc.bot.app_secret_sealed = sealed.app_secret_sealed;
        Ok(())
    }

    /// What `seal-secrets` would write for this record: its secret sealed with
    /// the current key, when it is plaintext or sealed with another key;
    /// `None` when there is nothing to do.
    pub fn resealed(&self, doc: &OrgIntegrationDoc) -> Result<Option<Resealed>, SecretError> {
        let current = self.keyring.sealing_key().ok_or(SecretError::NoSealingKey)?;
        if doc.kind == IntegrationKind::WorkflowWebhook {
            let sealed = self.workflow_seal(doc)?;
            if sealed.key_id == current {
                return Ok(None);
            }
            let url = self.workflow_url(doc)?;
            let url_sealed = self.seal_workflow_url(&doc.organization_id, &doc.integration_id, &url)?;
            return Ok(Some(Resealed::Workflow(WorkflowDoc { url_sealed })));
        }
        let owner = Owner::of(doc);
        let secret = match (&doc.bot.app_secret, &doc.bot.app_secret_sealed) {
            (Some(plain), None) => SecretString::from(plain.clone()),
            (None, Some(sealed)) if sealed.key_id != current => self.keyring.open(owner, sealed)?,
            _ => return Ok(None),
        };
        self.sealed_bot(owner, doc.bot.authority.clone(), &secret).map(|bot| Some(Resealed::Bot(bot)))
    }
}

/// A record's secret sealed anew (`Secrets::resealed`).
#[derive(Debug, Clone, PartialEq)]
pub enum Resealed {
    Bot(BotDoc),
    Workflow(WorkflowDoc),
}

/// The organization id as it appears in a variable or file name: only ids
/// that cannot be confused with another's prefix (no "__", no trailing "_",
/// no path separators or dots first).
fn referable(organization_id: &str) -> Result<&str, SecretError> {
    let ok = organization_id.len() <= 128
        && organization_id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !organization_id.ends_with('_')
        && !organization_id.contains("__")
        && organization_id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    match ok {
        true => Ok(organization_id),
        false => Err(SecretError::OrganizationNotReferable(crate::text::clip(organization_id, 128))),
    }
}

/// A variable's or file's own name: a letter or digit, then letters, digits,
/// '.', '-', '_' (no hidden files, no path).
fn plain_name(name: &str) -> bool {
    name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Read at most [`MAX_SECRET_BYTES`] of a regular file. Opened without
/// blocking (a FIFO would otherwise hang the open), then checked on the
/// opened file itself, so the check and the read see the same file.
fn read_bounded(path: &str) -> Result<String, SecretError> {
    let unreadable = |source| SecretError::FileUnreadable { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(SecretError::NotARegularFile(path.to_owned()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge(path.to_owned()));
    }
    String::from_utf8(bytes).map_err(|_| unreadable(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mongo::OrgIntegrationDoc;

    const KEY_1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_2: &str = "HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    fn settings(keys: &[(&str, &str)], seal_with: &str) -> SecretSettings {
        SecretSettings {
            keys: keys.iter().map(|(id, key)| (id.to_string(), SecretString::from(key.to_string()))).collect(),
            seal_with: seal_with.into(),
            accept_plaintext: false,
            env_prefix: "TEAMS_BOT_SECRET_".into(),
            directory: "/run/secrets/herald".into(),
        }
    }

    fn record(org: &str, bot: BotDoc) -> OrgIntegrationDoc {
        OrgIntegrationDoc::active(org, "teams-main", "tenant", "https://smba.trafficmanager.net/emea/", bot)
    }

    fn bot() -> BotDoc {
        BotDoc {
            app_id: "app".into(),
            app_secret: None,
            app_secret_sealed: None,
            app_secret_env: None,
            app_secret_file: None,
            authority: None,
        }
    }

    #[tokio::test]
    async fn a_sealed_secret_opens_only_for_the_record_it_was_sealed_for() {
        let secrets = Secrets::new(&settings(&[("k1", KEY_1)], "")).unwrap();
        let secret = SecretString::from("s3cret".to_owned());
        let acme = record("acme", bot());
        let sealed = secrets.sealed_bot(Owner::of(&acme), None, &secret).unwrap();
        assert!(!sealed.app_secret_sealed.as_ref().unwrap().ciphertext.contains("s3cret"));
        let acme = record("acme", sealed.clone());
        assert_eq!(secrets.read(&acme).await.unwrap().expose_secret(), "s3cret");
        // The same blob in another organization's record, or under another bot app id.
        let impostor = record("globex", sealed.clone());
        assert!(matches!(secrets.read(&impostor).await, Err(SecretError::DoesNotOpen { .. })));
        let other_app = record("acme", BotDoc { app_id: "other".into(), ..sealed.clone() });
        assert!(matches!(secrets.read(&other_app).await, Err(SecretError::DoesNotOpen { .. })));
        // One flipped bit of the ciphertext.
        let mut altered = sealed.clone();
        let blob = altered.app_secret_sealed.as_mut().unwrap();
        let mut bytes = BASE64.decode(&blob.ciphertext).unwrap();
        bytes[0] ^= 1;
        blob.ciphertext = BASE64.encode(bytes);
        assert!(matches!(secrets.read(&record("acme", altered)).await, Err(SecretError::DoesNotOpen { .. })));
    }

    #[test]
    fn a_webhook_url_opens_only_for_its_own_record_and_never_as_a_bot_secret() {
        let secrets = Secrets::new(&settings(&[("k1", KEY_1)], "")).unwrap();
        let url = SecretString::from("https://x.environment.api.powerplatform.com/w?sig=s".to_owned());
        let sealed = secrets.seal_workflow_url("acme", "main", &url).unwrap();
        let webhook = OrgIntegrationDoc::workflow_webhook("acme", "main", "tenant", sealed.clone());
        assert!(secrets.check(&webhook).is_ok());
        assert_eq!(secrets.workflow_url(&webhook).unwrap().expose_secret(), url.expose_secret());
        let copied = OrgIntegrationDoc::workflow_webhook("other", "main", "tenant", sealed.clone());
        assert!(matches!(secrets.workflow_url(&copied), Err(SecretError::DoesNotOpen { .. })), "another organization's record");
        // The same blob as a bot secret of the same record does not open.
        let as_bot = record("acme", BotDoc { app_id: String::new(), app_secret_sealed: Some(sealed), ..bot() });
        let as_bot = OrgIntegrationDoc { integration_id: "main".into(), ..as_bot };
        assert!(matches!(
            secrets.keyring().open(Owner::of(&as_bot), as_bot.bot.app_secret_sealed.as_ref().unwrap()),
            Err(SecretError::DoesNotOpen { .. })
        ));
        // A webhook record with a bot, or a bot record with a webhook, is refused.
        let mixed = OrgIntegrationDoc { bot: bot(), ..webhook.clone() };
        assert!(matches!(secrets.check(&mixed), Err(SecretError::WorkflowShape)));
        let mixed = OrgIntegrationDoc { workflow: webhook.workflow.clone(), ..record("acme", bot()) };
        assert!(matches!(secrets.check(&mixed), Err(SecretError::BotShape)));
    }

    #[tokio::test]
    async fn keys_rotate_open_with_any_seal_with_the_named_one() {
        let old = Secrets::new(&settings(&[("k1", KEY_1)], "")).unwrap();
        let acme = record("acme", bot());
        let sealed = record("acme", old.sealed_bot(Owner::of(&acme), None, &SecretString::from("x".to_owned())).unwrap());
        let both = Secrets::new(&settings(&[("k1", KEY_1), ("k2", KEY_2)], "k2")).unwrap();
        assert_eq!(both.read(&sealed).await.unwrap().expose_secret(), "x", "the old key still opens");
        let Some(Resealed::Bot(resealed)) = both.resealed(&sealed).unwrap() else { panic!("sealed with an old key: resealed") };
        assert_eq!(resealed.app_secret_sealed.as_ref().unwrap().key_id, "k2");
        let resealed = record("acme", resealed);
        assert!(both.resealed(&resealed).unwrap().is_none(), "already current");
        let new_only = Secrets::new(&settings(&[("k2", KEY_2)], "")).unwrap();
        assert_eq!(new_only.read(&resealed).await.unwrap().expose_secret(), "x");
        assert!(matches!(new_only.read(&sealed).await, Err(SecretError::UnknownKey { .. })));
    }

    #[test]
    fn a_key_ring_is_checked_when_it_is_loaded() {
        assert!(Keyring::from_settings(&settings(&[("k1", "c2hvcnQ=")], "")).unwrap_err().to_string().contains("32"));
        assert!(Keyring::from_settings(&settings(&[("k1", "not base64!")], "")).unwrap_err().to_string().contains("base64"));
        assert!(Keyring::from_settings(&settings(&[("k1", KEY_1), ("k2", KEY_2)], "")).unwrap_err().to_string().contains("seal_with"));
        assert!(Keyring::from_settings(&settings(&[("k1", KEY_1)], "k9")).unwrap_err().to_string().contains("k9"));
        assert_eq!(Keyring::from_settings(&settings(&[], "")).unwrap().sealing_key(), None);
        let debug = format!("{:?}", Keyring::from_settings(&settings(&[("k1", KEY_1)], "")).unwrap());
        assert!(!debug.contains(KEY_1) && debug.contains("k1"), "{debug}");
    }

    #[test]
    fn references_are_confined_to_the_records_own_organization() {
        let secrets = Secrets::new(&settings(&[], "")).unwrap();
        let env = |org: &str, var: &str| secrets.check(&record(org, BotDoc { app_secret_env: Some(var.into()), ..bot() }));
        let file = |org: &str, path: &str| secrets.check(&record(org, BotDoc { app_secret_file: Some(path.into()), ..bot() }));
        assert!(env("acme", "TEAMS_BOT_SECRET_acme__MAIN").is_ok());
        assert!(env("org-a.eu", "TEAMS_BOT_SECRET_org-a.eu__x").is_ok());
        for (org, var) in [
            ("acme", "TEAMS_BOT_SECRET_globex__MAIN"),
            ("acme", "HERALD_MONGODB_URI"),
            ("acme", "TEAMS_BOT_SECRET_acme__"),
            ("acme", "TEAMS_BOT_SECRET_acme_MAIN"),
            ("acme", "TEAMS_BOT_SECRET_acme__a/b"),
            // A name starts with a letter or digit: "a" has no "_x".
            ("a", "TEAMS_BOT_SECRET_a___x"),
        ] {
            assert!(matches!(env(org, var), Err(SecretError::EnvOutOfScope { .. })), "{org} {var}");
        }
        for org in ["a_", "a__b", "_a", "../a", "", "a/b"] {
            assert!(matches!(env(org, "TEAMS_BOT_SECRET_x"), Err(SecretError::OrganizationNotReferable(_))), "{org:?}");
        }
        assert!(file("acme", "/run/secrets/herald/acme/bot").is_ok());
        for path in [
            "/run/secrets/herald/globex/bot",
            "/run/secrets/herald/acme/../globex/bot",
            "/run/secrets/herald/acme/sub/bot",
            "/run/secrets/herald/acme/.hidden",
            "/run/secrets/herald/acme/",
            "/dev/zero",
            "/proc/self/environ",
        ] {
            assert!(matches!(file("acme", path), Err(SecretError::FileOutOfScope { .. })), "{path}");
        }
        let off = Secrets::new(&SecretSettings { directory: String::new(), ..settings(&[], "") }).unwrap();
        let record = record("acme", BotDoc { app_secret_file: Some("/run/secrets/herald/acme/bot".into()), ..bot() });
        assert!(matches!(off.check(&record), Err(SecretError::FilesOff)));
    }

    #[test]
    fn plaintext_and_several_sources_are_refused() {
        let strict = Secrets::new(&settings(&[], "")).unwrap();
        let plain = record("acme", BotDoc { app_secret: Some("p".into()), ..bot() });
        assert!(matches!(strict.check(&plain), Err(SecretError::Plaintext)));
        let migrating = Secrets::new(&SecretSettings { accept_plaintext: true, ..settings(&[], "") }).unwrap();
        assert!(migrating.check(&plain).is_ok());
        let two = record("acme", BotDoc { app_secret: Some("p".into()), app_secret_env: Some("TEAMS_BOT_SECRET_acme__A".into()), ..bot() });
        assert!(matches!(migrating.check(&two), Err(SecretError::SeveralSources)));
        assert!(matches!(strict.check(&record("acme", bot())), Err(SecretError::NoSource)));
    }

    #[tokio::test]
    async fn files_are_read_bounded_and_only_when_regular() {
        let dir = std::env::temp_dir().join(format!("herald-secrets-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("acme")).unwrap();
        let secrets = Secrets::new(&SecretSettings { directory: dir.display().to_string(), ..settings(&[], "") }).unwrap();
        let at = |name: &str| record("acme", BotDoc { app_secret_file: Some(format!("{}/acme/{name}", dir.display())), ..bot() });
        std::fs::write(dir.join("acme/bot"), "  s3cret\n").unwrap();
        assert_eq!(secrets.read(&at("bot")).await.unwrap().expose_secret(), "s3cret");
        std::fs::write(dir.join("acme/huge"), vec![b'x'; MAX_SECRET_BYTES + 1]).unwrap();
        assert!(matches!(secrets.read(&at("huge")).await, Err(SecretError::TooLarge(_))));
        std::os::unix::fs::symlink("/dev/zero", dir.join("acme/zero")).unwrap();
        assert!(matches!(secrets.read(&at("zero")).await, Err(SecretError::NotARegularFile(_))));
        let fifo = dir.join("acme/fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(matches!(secrets.read(&at("fifo")).await, Err(SecretError::NotARegularFile(_))), "a FIFO is refused, not waited on");
        assert!(matches!(secrets.read(&at("missing")).await, Err(SecretError::FileUnreadable { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

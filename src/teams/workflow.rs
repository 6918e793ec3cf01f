//! Teams Workflows (Power Automate) webhooks: a URL that posts a card where
//! its flow says, with no bot and no token. The URL carries the flow's
//! signature in its query, so it is a secret: it is kept sealed at rest
//! (`crate::secrets`), checked against its cloud's hosts, and never shown
//! beyond its host and path.

use std::fmt;

use sha2::{Digest, Sha256};
use url::Url;

use crate::settings::is_loopback;

/// Where a cloud's webhooks may be: https to an allow-listed host (an entry
/// starting with `.` allows every host under that domain), plain http only
/// to a configured loopback host.
#[derive(Debug, Clone)]
pub struct WorkflowPolicy {
    hosts: Vec<String>,
    insecure_loopback_hosts: Vec<String>,
}

impl WorkflowPolicy {
    pub fn new(hosts: Vec<String>, insecure_loopback_hosts: Vec<String>) -> Self {
        let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        Self { hosts: lower(hosts), insecure_loopback_hosts: lower(insecure_loopback_hosts) }
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.hosts.iter().any(|allowed| match allowed.strip_prefix('.') {
            Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => host == allowed,
        })
    }

    /// The webhook, if herald may post to it.
    pub fn check(&self, url: &str) -> Result<Workflow, &'static str> {
        let url = Url::parse(url.trim()).map_err(|_| "not a URL")?;
        let host = url.host_str().ok_or("no host")?.to_ascii_lowercase();
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL");
        }
        let allowed = match url.scheme() {
            "https" => self.host_allowed(&host),
            "http" => self.insecure_loopback_hosts.contains(&host) && is_loopback(&host),
            _ => false,
        };
        if !allowed {
            return Err(if self.host_allowed(&host) {
                "only https is allowed for this host"
            } else {
                "host is not on the cloud's workflow_hosts"
            });
        }
        if url.fragment().is_some() {
            return Err("fragment in the URL");
        }
        if !url.query_pairs().any(|(key, value)| key == "sig" && !value.is_empty()) {
            return Err("no signature: a Workflows URL carries `sig=` in its query (copy the whole URL)");
        }
        Ok(Workflow::new(url))
    }
}

/// A webhook checked against its cloud's hosts. `Debug` and [`Workflow::shown`]
/// leave out the query (the signature).
#[derive(Clone)]
pub struct Workflow {
    url: Url,
    shown: String,
    key: String,
}

impl Workflow {
    fn new(url: Url) -> Self {
        let mut shown = url.clone();
        shown.set_query(None);
        let shown = crate::text::clip(shown.as_str(), 200);
        let digest = Sha256::digest(url.as_str().as_bytes());
        let key = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        Self { url, shown, key }
    }

    /// Where to post, signature included: for the request only.
    pub(super) fn url(&self) -> &Url {
        &self.url
    }

    /// The URL without its query, for logs and tools.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A digest of the whole URL: the webhook's pacing key, which names it
    /// without revealing it.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow").field("url", &self.shown).field("key", &self.key).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> WorkflowPolicy {
        WorkflowPolicy::new(
            vec![".environment.api.powerplatform.com".into(), "prod-1.westus.logic.azure.com".into()],
            vec!["127.0.0.1".into()],
        )
    }

    const PATH: &str = "/powerautomate/automations/direct/workflows/abc/triggers/manual/paths/invoke";

    #[test]
    fn only_signed_https_urls_on_the_clouds_hosts() {
        let p = policy();
        let good = format!("https://default1234.56.environment.api.powerplatform.com:443{PATH}?api-version=1&sig=s3cr3t");
        let workflow = p.check(&good).unwrap();
        assert!(!workflow.shown().contains("s3cr3t") && !format!("{workflow:?}").contains("s3cr3t"), "{workflow:?}");
        assert!(workflow.shown().ends_with("/paths/invoke"), "{}", workflow.shown());
        assert!(p.check("https://prod-1.westus.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=x").is_ok());
        assert!(p.check(&format!("http://127.0.0.1:3978{PATH}?sig=x")).is_ok());
        for bad in [
            format!("http://default1234.environment.api.powerplatform.com{PATH}?sig=x"),
            format!("https://environment.api.powerplatform.com{PATH}?sig=x"),
            format!("https://evil.com/.environment.api.powerplatform.com{PATH}?sig=x"),
            format!("https://x.environment.api.powerplatform.com.evil.com{PATH}?sig=x"),
            format!("https://xenvironment.api.powerplatform.com{PATH}?sig=x"),
            format!("https://prod-2.westus.logic.azure.com{PATH}?sig=x"),
            format!("https://a:b@x.environment.api.powerplatform.com{PATH}?sig=x"),
            format!("https://x.environment.api.powerplatform.com{PATH}"),
            format!("https://x.environment.api.powerplatform.com{PATH}?sig="),
            format!("https://x.environment.api.powerplatform.com{PATH}?sig=x#frag"),
            format!("http://localhost:3978{PATH}?sig=x"),
            "not a url".to_owned(),
        ] {
            assert!(p.check(&bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn the_key_names_the_whole_url_and_differs_by_signature() {
        let p = policy();
        let a = p.check(&format!("https://x.environment.api.powerplatform.com{PATH}?sig=a")).unwrap();
        let b = p.check(&format!("https://x.environment.api.powerplatform.com{PATH}?sig=b")).unwrap();
        assert_ne!(a.key(), b.key());
        assert_eq!(a.shown(), b.shown());
        assert_eq!(a.key().len(), 24);
    }
}

//! Microsoft clouds and where their bearer tokens may go (docs/contract.md §1).

use url::Url;

use super::TeamsError;
use crate::settings::is_loopback;

/// One Microsoft cloud: its token endpoint and scope, and the only hosts its
/// tokens may be sent to.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub name: String,
    pub token_endpoint: String,
    pub multi_tenant_authority: String,
    pub scope: String,
    pub policy: ServiceUrlPolicy,
    /// Where this cloud's Workflows webhooks may be.
    pub workflows: super::WorkflowPolicy,
}

/// Where bearer tokens may go: https to an allow-listed host, plain http only
/// to a configured loopback host.
#[derive(Debug, Clone)]
pub struct ServiceUrlPolicy {
    allowed_hosts: Vec<String>,
    insecure_loopback_hosts: Vec<String>,
}

impl ServiceUrlPolicy {
    pub fn new(allowed_hosts: Vec<String>, insecure_loopback_hosts: Vec<String>) -> Self {
        let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        Self { allowed_hosts: lower(allowed_hosts), insecure_loopback_hosts: lower(insecure_loopback_hosts) }
    }

    /// The parsed service URL (with a trailing slash) if a token may be sent there.
    pub fn check(&self, service_url: &str) -> Result<Url, TeamsError> {
        // The refusal names the URL without any credentials it carries.
        let refuse = |why: &str| TeamsError::ServiceUrlNotAllowed { url: redact(service_url), why: why.to_owned() };
        let mut url = Url::parse(service_url).map_err(|_| refuse("not a URL"))?;
        self.allows(&url).map_err(refuse)?;
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(url)
    }

    /// Why a token may not be sent to `url`, if it may not (the check of
    /// [`ServiceUrlPolicy::check`] on a URL already parsed).
    pub fn allows(&self, url: &Url) -> Result<(), &'static str> {
        let host = url.host_str().ok_or("no host")?.to_ascii_lowercase();
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL");
        }
        let allowed = match url.scheme() {
            "https" => self.allowed_hosts.contains(&host),
            "http" => self.insecure_loopback_hosts.contains(&host) && is_loopback(&host),
            _ => false,
        };
        if !allowed {
            return Err(if self.allowed_hosts.contains(&host) {
                "only https is allowed for this host"
            } else {
                "host is not on the allowlist"
            });
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("query or fragment in the URL");
        }
        Ok(())
    }
}

/// A URL fit for a log line or a dead letter: user, password, query and
/// fragment replaced, and at most 200 characters. Text that is not a URL is
/// reduced to its length.
pub fn redact(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            if !url.username().is_empty() {
                let _ = url.set_username("***");
            }
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            if url.query().is_some() {
                url.set_query(Some("***"));
            }
            if url.fragment().is_some() {
                url.set_fragment(Some("***"));
            }
            crate::text::clip(url.as_str(), 200)
        }
        Err(_) => format!("<not a URL, {} bytes>", text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ServiceUrlPolicy {
        ServiceUrlPolicy::new(vec!["smba.trafficmanager.net".into()], vec!["127.0.0.1".into()])
    }

    #[test]
    fn only_allow_listed_https_hosts_and_configured_loopback_http() {
        let p = policy();
        assert_eq!(p.check("https://smba.trafficmanager.net/amer").unwrap().as_str(), "https://smba.trafficmanager.net/amer/");
        assert!(p.check("https://SMBA.trafficmanager.net/teams/").is_ok());
        assert!(p.check("http://127.0.0.1:3978/teams/").is_ok());
        for bad in [
            "http://smba.trafficmanager.net/teams/",
            "https://smba.trafficmanager.net.evil.com/teams/",
            "https://evil.com/teams/",
            "http://localhost:3978/teams/",
            "https://127.0.0.1/teams/",
            "https://user:pw@smba.trafficmanager.net/teams/",
            "https://smba.trafficmanager.net/teams/?x=1",
            "ftp://smba.trafficmanager.net/",
            "not a url",
        ] {
            assert!(matches!(p.check(bad), Err(TeamsError::ServiceUrlNotAllowed { .. })), "{bad} must be refused");
        }
    }

    #[test]
    fn a_refused_url_never_repeats_its_credentials() {
        let err = policy().check("https://admin:hunter2@evil.com/teams/?sig=topsecret").unwrap_err().to_string();
        assert!(!err.contains("hunter2") && !err.contains("topsecret") && !err.contains("admin"), "{err}");
        let err = policy().check(&format!("not a url {}", "x".repeat(100_000))).unwrap_err().to_string();
        assert!(err.len() < 300, "{} bytes", err.len());
    }
}

//! The HTTP client of the Connector's posts: hyper's pooled HTTP/1.1 client
//! over rustls, with nothing between the step and the socket but the
//! request itself (reqwest's redirect, timeout and URL layers cost more per
//! post than hyper's own send; docs/benchmarks.md).
//!
//! - TLS as reqwest builds it: rustls with aws-lc-rs, the platform's
//!   certificate verifier, ALPN `http/1.1`.
//! - Redirects are never followed: a 3xx is an answer like any other.
//! - `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` (curl's rules) apply to https
//!   service URLs: the proxy sees a `CONNECT host:443`, never the request or
//!   its bearer token. Plain http is only ever allowed for configured
//!   loopback hosts (`insecure_loopback_hosts`), which go direct.
//! - Every exchange, the body included, ends within the time it is given.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::TeamsError;
use super::answer::{BodyError, read_body};

const HERALD_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));
pub const JSON: &str = "application/json";
pub const FORM: &str = "application/x-www-form-urlencoded";

/// An answer, its body read up to [`MAX_BODY_BYTES`].
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Vec<u8>, BodyError>,
}

/// `Bearer <token>` as an `Authorization` value, marked sensitive (never
/// shown in `Debug`); an error if the token cannot be a header value.
pub fn bearer(token: &str) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the platform's certificate verifier cannot be loaded: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Proxy(String),
}

type Direct = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;
type Tunneled = Client<HttpsConnector<Tunnel<HttpConnector>>, Full<Bytes>>;

pub struct Connector {
    direct: Direct,
    /// Through the proxy the environment names for https, if any.
    proxied: Option<(Matcher, Tunneled)>,
    user_agent: HeaderValue,
}

impl Connector {
    /// A client whose connections give up after `connect_timeout`, with the
    /// proxy settings `proxy` (usually [`Matcher::from_env`]).
    pub fn new(connect_timeout: Duration, proxy: Matcher) -> Result<Self, SetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = Arc::new(tls);

        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let client = || {
            let mut builder = Client::builder(TokioExecutor::new());
            builder.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(90));
            builder
        };
        let direct = client().build(HttpsConnector::from((tcp.clone(), tls.clone())));
        let proxied = match Self::https_proxy(&proxy)? {
            None => None,
            Some((at, auth)) => {
                let tunnel = Tunnel::new(at, tcp);
                let tunnel = match auth {
                    Some(auth) => tunnel.with_auth(auth),
                    None => tunnel,
                };
                Some((proxy, client().build(HttpsConnector::from((tunnel, tls)))))
            }
        };
        Ok(Self { direct, proxied, user_agent: HeaderValue::from_static(HERALD_AGENT) })
    }

    /// The https proxy of `matcher` (its URI and credentials), if it names
    /// one. Only `http://` proxies are supported: the connection to the proxy
    /// is plain TCP, and TLS runs end to end through the tunnel.
    fn https_proxy(matcher: &Matcher) -> Result<Option<(Uri, Option<HeaderValue>)>, SetupError> {
        // The same proxy serves every https host that `NO_PROXY` leaves to it.
        let any_host: Uri = "https://herald.invalid/".parse().expect("a valid URI");
        let Some(intercept) = matcher.intercept(&any_host) else { return Ok(None) };
        let uri = intercept.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(SetupError::Proxy(format!(
                "the https proxy must be an http:// URL (herald tunnels through it with CONNECT), not {}://",
                uri.scheme_str().unwrap_or("?")
            )));
        }
        Ok(Some((uri, intercept.basic_auth().cloned())))
    }

    /// POST `body` (of `content_type`) to `uri`, with the `Authorization`
    /// value `authorization` if given ([`bearer`]), and read the answer, all
    /// within `timeout`. `Unsent` when no connection could be made,
    /// `Ambiguous` when the request may have reached the server but no
    /// complete answer came back.
    pub async fn post(
        &self,
        uri: Uri,
        authorization: Option<HeaderValue>,
        content_type: &'static str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, TeamsError> {
        let mut request = Request::post(uri)
            .header(USER_AGENT, self.user_agent.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
            .body(Full::new(body))
            .map_err(|err| TeamsError::Unsent { what: format!("POST: {err}") })?;
        if let Some(value) = authorization {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let uri = request.uri();
        let via_proxy =
            uri.scheme_str() == Some("https") && self.proxied.as_ref().is_some_and(|(matcher, _)| matcher.intercept(uri).is_some());
        let exchange = async {
            let sent = match (&self.proxied, via_proxy) {
                (Some((_, client)), true) => client.request(request).await,
                _ => self.direct.request(request).await,
            };
            let response = sent.map_err(|err| {
                let what = format!("POST: {}", crate::text::error_chain(&err));
                if err.is_connect() { TeamsError::Unsent { what } } else { TeamsError::Ambiguous { what } }
            })?;
            let (parts, incoming) = response.into_parts();
            Ok(Answer { status: parts.status, headers: parts.headers, body: read_body(incoming).await })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(TeamsError::Ambiguous { what: format!("POST: no complete answer within {timeout:?}") }),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const TOKEN: &str = "eyJ-the-bearer-token";

    /// A listener that keeps the first bytes each connection sends, then
    /// answers `reply` and closes.
    async fn listener(reply: &'static str) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 4096 {
                match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = socket.write_all(reply.as_bytes()).await;
            seen
        });
        (port, seen)
    }

    fn proxy(http: &str, https: &str, no: &str) -> Matcher {
        Matcher::builder().http(http.to_owned()).https(https.to_owned()).no(no.to_owned()).build()
    }

    #[tokio::test]
    async fn https_goes_through_the_proxy_as_a_tunnel_that_never_carries_the_token() {
        let (port, seen) = listener("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        let connector = Connector::new(Duration::from_secs(2), proxy("", &format!("http://127.0.0.1:{port}"), "")).unwrap();
        let uri: Uri = "https://smba.trafficmanager.net/teams/v3/conversations/a:1/activities".parse().unwrap();
        let result = connector.post(uri, Some(bearer(TOKEN).unwrap()), JSON, Bytes::from_static(b"{}"), Duration::from_secs(5)).await;
        // The proxy refused the tunnel: nothing reached the Connector.
        assert!(matches!(result, Err(TeamsError::Unsent { .. })), "{:?}", result.err());
        let seen = String::from_utf8(seen.await.unwrap()).unwrap();
        assert!(seen.starts_with("CONNECT smba.trafficmanager.net:443 HTTP/1.1\r\n"), "{seen}");
        assert!(!seen.contains(TOKEN) && !seen.contains("activities"), "the proxy saw more than the host: {seen}");
    }

    #[tokio::test]
    async fn no_proxy_hosts_and_plain_http_go_direct() {
        let (proxy_port, proxy_seen) = listener("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let at = format!("http://127.0.0.1:{proxy_port}");
        let answer = "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\":\"1\"}";

        // Plain http (only ever a configured loopback host) never goes to the proxy.
        let (port, seen) = listener(answer).await;
        let connector = Connector::new(Duration::from_secs(2), proxy(&at, &at, "")).unwrap();
        let uri: Uri = format!("http://127.0.0.1:{port}/v3/conversations/a:1/activities").parse().unwrap();
        let answered =
            connector.post(uri, Some(bearer(TOKEN).unwrap()), JSON, Bytes::from_static(b"{}"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(answered.status, StatusCode::CREATED);
        assert_eq!(answered.body.unwrap(), b"{\"id\":\"1\"}");
        let seen = String::from_utf8(seen.await.unwrap()).unwrap();
        assert!(seen.starts_with("POST /v3/conversations/a:1/activities HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains(&format!("authorization: Bearer {TOKEN}\r\n")), "{seen}");

        // An https host that NO_PROXY names is dialled directly: the first
        // bytes there are a TLS handshake, not a CONNECT.
        let (port, seen) = listener("").await;
        let connector = Connector::new(Duration::from_secs(2), proxy(&at, &at, "localhost")).unwrap();
        let uri: Uri = format!("https://localhost:{port}/v3/conversations/a:1/activities").parse().unwrap();
        assert!(connector.post(uri, Some(bearer(TOKEN).unwrap()), JSON, Bytes::from_static(b"{}"), Duration::from_secs(5)).await.is_err());
        let seen = seen.await.unwrap();
        assert_eq!(seen.first(), Some(&0x16), "a TLS record (handshake) first, got {:?}", String::from_utf8_lossy(&seen));
        assert!(!String::from_utf8_lossy(&seen).contains(TOKEN));

        // A request sent through it would have ended only after its answer.
        assert!(!proxy_seen.is_finished(), "the proxy was dialled");
        proxy_seen.abort();
    }

    #[tokio::test]
    async fn an_https_proxy_url_is_refused_at_start() {
        let err = Connector::new(Duration::from_secs(2), proxy("", "https://proxy.example:3128", "")).err().expect("refused");
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_ambiguous_within_the_time_given() {
        // Accepts, reads the request, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let connector = Connector::new(Duration::from_secs(2), proxy("", "", "")).unwrap();
        let uri: Uri = format!("http://127.0.0.1:{port}/v3/conversations/a:1/activities").parse().unwrap();
        let started = std::time::Instant::now();
        let result = connector.post(uri, Some(bearer(TOKEN).unwrap()), JSON, Bytes::from_static(b"{}"), Duration::from_millis(300)).await;
        assert!(matches!(result, Err(TeamsError::Ambiguous { .. })), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(5), "ended by the timeout");
    }

    #[tokio::test]
    async fn a_refused_connection_is_unsent() {
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let connector = Connector::new(Duration::from_secs(2), proxy("", "", "")).unwrap();
        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        let result = connector.post(uri, None, FORM, Bytes::from_static(b"a=b"), Duration::from_secs(2)).await;
        assert!(matches!(result, Err(TeamsError::Unsent { .. })), "{:?}", result.err());
    }
}

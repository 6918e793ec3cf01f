//! `herald doctor`'s own TLS handshake with the broker or MongoDB: which
//! protocol version and cipher suite the server negotiates, and whether its
//! certificate verifies with the CAs herald is given (or the system's).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The CAs and the client certificate of one connection (PEM file paths).
#[derive(Debug, Default, Clone)]
pub struct Trust {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    /// The key; the certificate's file when both are in one (MongoDB's tlsCertificateKeyFile).
    pub key_file: Option<String>,
}

/// Handshake with `host:port` and describe it: "TLSv1_3, TLS13_AES_256_GCM_SHA384".
pub async fn probe(host: String, port: u16, trust: Trust) -> Result<String, String> {
    tokio::task::spawn_blocking(move || handshake(&host, port, &trust)).await.map_err(|e| e.to_string())?
}

fn handshake(host: &str, port: u16, trust: &Trust) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let builder = match &trust.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))? {
                roots.add(cert.map_err(|e| format!("{path}: {e}"))?).map_err(|e| format!("{path}: {e}"))?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| e.to_string())?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    let config = match (&trust.cert_file, &trust.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("{cert}: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{cert}: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let address = (host, port).to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or_else(|| format!("{host}: no address"))?;
    let mut tcp = TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp).map_err(|e| format!("TLS handshake failed: {e}"))?;
    }
    let version = connection.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "unknown".into());
    let suite = connection.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "unknown".into());
    // Close politely; the server may already have closed.
    connection.send_close_notify();
    let _ = connection.write_tls(&mut tcp);
    let _ = tcp.flush();
    let _ = tcp.read(&mut [0; 1]);
    let verified = if trust.ca_file.is_some() { "the given CA" } else { "the system's CAs" };
    Ok(format!("{version}, {suite}, certificate verified with {verified}"))
}

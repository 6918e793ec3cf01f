//! herald over TLS: RabbitMQ's TLS listener (127.0.0.1:5671, made by
//! scripts/services.sh with its own CA, requiring a client certificate) and a
//! MongoDB-protocol server started here with a CA made here, also requiring
//! a client certificate. A worker delivers through both; `herald doctor`
//! reports the TLS each negotiates, and fails clearly without the client
//! certificate or with the wrong CA.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use figment::providers::Serialized;

use crate::support::*;

/// The broker's test CA and client certificate (scripts/services.sh).
const BROKER_TLS: &str = "/etc/rabbitmq/herald-test-tls";

/// A CA, and a server and a client certificate for localhost signed by it,
/// made with openssl in `dir`. The client's certificate and key are also
/// written together (`client-both.pem`, as MongoDB's tlsCertificateKeyFile wants).
fn make_ca(dir: &Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tls test CA",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, pem) = (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"));
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={who}")]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
    }
    let both = [std::fs::read(dir.join("client.pem")).unwrap(), std::fs::read(dir.join("client.key")).unwrap()].concat();
    std::fs::write(dir.join("client-both.pem"), both).unwrap();
}

/// A SecantusDB that speaks only TLS and requires a client certificate of
/// the CA in `dir`; killed when dropped.
struct TlsMongo {
    process: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl TlsMongo {
    async fn start(dir: &Path) -> Self {
        let port = free_port();
        let storage = dir.join("data");
        std::fs::create_dir_all(&storage).unwrap();
        let file = |name: &str| dir.join(name).display().to_string();
        let process = std::process::Command::new("secantusd-rs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--storage-path", &storage.display().to_string()])
            .args(["--cache-size", "64M", "--log-file-max", "4MB"])
            .args(["--tls-cert-file", &file("server.pem"), "--tls-key-file", &file("server.key")])
            .args(["--tls-ca-file", &file("ca.pem"), "--tls-require-client-cert"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("secantusd-rs starts");
        eventually("the TLS MongoDB to listen", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
        })
        .await;
        Self { process, port, dir: dir.to_owned() }
    }

    fn uri(&self, dir: &Path) -> String {
        format!(
            "mongodb://localhost:{}/?directConnection=true&tls=true&tlsCAFile={}&tlsCertificateKeyFile={}",
            self.port,
            dir.join("ca.pem").display(),
            dir.join("client-both.pem").display()
        )
    }
}

impl Drop for TlsMongo {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_delivers_over_tls_to_rabbitmq_and_mongodb_with_a_private_ca_and_client_certificates() {
    let dir = std::env::temp_dir().join(format!("herald-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir);
    let mongo = TlsMongo::start(&dir).await;
    let uri = mongo.uri(&dir);
    // The test's own records go through the TLS server too.
    let env = TestEnv::with(two_org_world(), Default::default(), |f| f.merge(Serialized::default("mongodb_uri", &uri))).await;
    env.seed_two_orgs().await;

    let broker = |name: &str| format!("{BROKER_TLS}/{name}");
    let tls: Vec<(String, String)> = vec![
        ("HERALD_AMQP_URL".into(), "amqps://guest:guest@localhost:5671/%2f".into()),
        ("HERALD_AMQP_TLS__CA_FILE".into(), broker("ca.pem")),
        ("HERALD_AMQP_TLS__CERT_FILE".into(), broker("client.pem")),
        ("HERALD_AMQP_TLS__KEY_FILE".into(), broker("client.key")),
        ("HERALD_MONGODB_URI".into(), uri.clone()),
    ];
    let doctor = |overrides: Vec<(String, String)>| {
        let mut command = env.herald_command(&["doctor"]);
        command.envs(tls.iter().cloned()).envs(overrides).stdout(Stdio::piped()).stderr(Stdio::piped());
        async move { command.output().await.unwrap() }
    };

    let report = doctor(vec![]).await;
    let text = stdout(&report);
    assert!(report.status.success(), "{text}{}", stderr(&report));
    assert!(text.contains("ok    rabbitmq tls: TLSv1_3"), "{text}");
    assert!(text.contains("ok    mongodb tls: TLSv1_3"), "{text}");
    assert!(text.contains("certificate verified with the given CA"), "{text}");

    let extra: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = env.worker_process(&extra);
    env.publish(&job("org-a", CONV_A, "over TLS")).await;
    let records = env.activities(1).await;
    assert_eq!(title(&records[0]), "over TLS");
    terminate(worker).await;

    // The broker requires a client certificate.
    let without =
        doctor(vec![("HERALD_AMQP_TLS__CERT_FILE".into(), String::new()), ("HERALD_AMQP_TLS__KEY_FILE".into(), String::new())]).await;
    assert!(!without.status.success());
    assert!(stdout(&without).contains("FAIL  rabbitmq: amqps://guest:***@localhost:5671/"), "{}", stdout(&without));
    // The broker's certificate is not signed by MongoDB's test CA.
    let wrong = doctor(vec![("HERALD_AMQP_TLS__CA_FILE".into(), dir.join("ca.pem").display().to_string())]).await;
    assert!(!wrong.status.success());
    assert!(stdout(&wrong).contains("FAIL  rabbitmq"), "{}", stdout(&wrong));
}

//! TLS on the listener, with real clients: curl for https://, a rustls WebSocket client
//! for wss://, certificates made by the openssl command; a reload by SIGHUP and by a
//! file change, with connections made before it still working.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::ring,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tokio_tungstenite::{WebSocketStream, client_async, tungstenite::Message};

/// A self-signed certificate for localhost and 127.0.0.1, and its key, in `dir/name.*`.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A leaf, not a CA: webpki refuses a CA certificate as a server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    (cert, key)
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gateway-tls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// curl's status code for `url` trusting `ca`, with extra flags; None if the request failed.
fn curl(server: &Server, ca: &Path, path: &str, extra: &[&str]) -> Option<u16> {
    let port = server.addr.port();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).parse().ok())
        .flatten()
}

type Wss = WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A wss:// connection trusting only `ca`; also returns the certificate the server showed.
async fn wss(server: &Server, ca: &Path) -> Result<(Wss, Vec<u8>), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let url = format!("wss://localhost:{}/ws?format=json", server.addr.port());
    let (ws, _) = client_async(url, tls).await.map_err(|e| e.to_string())?;
    Ok((ws, shown))
}

/// A JSON ping over the connection; true when the node answers it.
async fn pings(ws: &mut Wss, id: u32) -> bool {
    let frame = format!(r#"{{"id":{id},"ping":{{}}}}"#);
    if ws.send(Message::Text(frame.into())).await.is_err() {
        return false;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = m
            && t.contains(&format!(r#""id":{id}"#))
        {
            return true;
        }
    }
    false
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

#[tokio::test]
async fn wss_and_https_with_a_reload_that_keeps_connections() {
    let dir = temp_dir();
    let (cert_a, key_a) = make_cert(&dir, "first");
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let server = Server::start_with(
        "",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );

    // https:// with curl; TLS 1.2 and 1.3 are spoken, 1.1 is not; plain HTTP is refused.
    assert_eq!(curl(&server, &cert_a, "/healthz", &[]), Some(200));
    assert_eq!(
        curl(
            &server,
            &cert_a,
            "/healthz",
            &["--tlsv1.2", "--tls-max", "1.2"]
        ),
        Some(200)
    );
    assert_eq!(
        curl(
            &server,
            &cert_a,
            "/healthz",
            &["--tlsv1.1", "--tls-max", "1.1"]
        ),
        None
    );
    let plain = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    };
    assert!(
        !plain.starts_with(b"HTTP/1.1 200"),
        "plain HTTP is not served"
    );

    // wss://: a session works end to end.
    let (mut before, shown) = wss(&server, &cert_a).await.unwrap();
    assert_eq!(shown, der_of(&cert_a));
    assert!(pings(&mut before, 1).await);

    // Reload by SIGHUP: new handshakes get the new certificate, the old connection stays.
    let (cert_b, key_b) = make_cert(&dir, "second");
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = loop {
        if let Ok((ws, shown)) = wss(&server, &cert_b).await
            && shown == der_of(&cert_b)
        {
            break ws;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(pings(&mut after, 2).await);
    assert!(
        pings(&mut before, 3).await,
        "a connection from before the reload still works"
    );
    assert!(
        wss(&server, &cert_a).await.is_err(),
        "the old certificate is gone"
    );

    // A broken file is refused and the current certificate stays (file-change reload).
    std::fs::write(&key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut still, shown) = wss(&server, &cert_b).await.unwrap();
    assert_eq!(shown, der_of(&cert_b));
    assert!(pings(&mut still, 4).await);

    // Without a SIGHUP, a changed pair is picked up within the watch period.
    let (cert_c, key_c) = make_cert(&dir, "third");
    std::fs::copy(&key_c, &key).unwrap();
    std::fs::copy(&cert_c, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((_, shown)) = wss(&server, &cert_c).await
            && shown == der_of(&cert_c)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changed files were never loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(pings(&mut before, 5).await);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tls_needs_both_files_and_readable_ones() {
    let dir = temp_dir();
    let bin = env!("CARGO_BIN_EXE_gateway");
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    };
    assert!(!run(&["--tls-cert", "/nonexistent.crt"]).success());
    let missing = dir.join("missing.key");
    let (cert, _) = make_cert(&dir, "x");
    assert!(
        !run(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            missing.to_str().unwrap()
        ])
        .success()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `rediss://`: the broker reaches a `redis-server` that listens with TLS only on the port
/// it is given, trusting the CA from `SSL_CERT_FILE`; publications cross two nodes over it.
/// Without the CA the connection is refused (108), so the traffic really is TLS.
#[tokio::test]
async fn the_broker_reaches_redis_over_tls() {
    let dir = temp_dir();
    let (cert, key) = make_cert(&dir, "redis");
    let tls_port = free_port();
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tls_port_s = tls_port.to_string();
    let _redis = Redis::start_with(
        false,
        &[
            "--tls-port",
            &tls_port_s,
            "--tls-cert-file",
            cert_s,
            "--tls-key-file",
            key_s,
            "--tls-ca-cert-file",
            cert_s,
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let config = "[namespaces.default]\n";
    let env = [("SSL_CERT_FILE", cert_s)];
    let args = ["--redis-url", url.as_str(), "--api-key", "test-key"];
    let a = Server::start_with_env(config, &args, &env);
    let b = Server::start_with_env(config, &args, &env);
    a.wait_ready(Duration::from_secs(10));
    b.wait_ready(Duration::from_secs(10));
    let mut sub = b.client(broker_proto::Encoding::Proto).await;
    ok(sub.call(subscribe("over-tls")).await);
    let mut publisher = a.client(broker_proto::Encoding::Proto).await;
    ok(publisher.call(publish("over-tls", "secret")).await);
    match sub.push().await {
        broker_proto::v1::server_frame::Body::Publication(p) => {
            assert_eq!(&p.data[..], b"secret");
            assert_eq!(p.offset, 1);
        }
        other => panic!("{other:?}"),
    }
    // A node that does not trust the server's certificate cannot use it.
    let untrusting = Server::start_with_env(
        config,
        &["--redis-url", url.as_str()],
        &[("SSL_CERT_FILE", "/nonexistent")],
    );
    let mut c = untrusting.client(broker_proto::Encoding::Proto).await;
    let f = c.call(publish("over-tls", "no")).await;
    assert_eq!(error_code(&f), Some(108), "{f:?}");
    let _ = std::fs::remove_dir_all(dir);
}

//! The operator's Kubernetes client: kube's default HTTP stack (TLS and auth from the
//! kubeconfig or the pod's service account, connect/read/write timeouts, retries of 429, 503 and
//! 504 answers, impersonation headers; a kubeconfig `proxy-url` refused, as kube's own client
//! without its proxy features refuses it), assembled here for settings kube does not expose.
//!
//! hyper sizes each HTTP/1 connection's read buffer to the reads it sees, up to ~400 KB, and
//! the buffer keeps that size for the life of the connection. Every watch holds a connection,
//! so after the initial lists each watch kept a few hundred KB of buffer it no longer needed:
//! ~1.9 MB of the operator's heap at 1,000 pipelines (heaptrack, docs/benchmarks.md). Capped
//! at [`MAX_READ_BUFFER`], a large list is read in more, smaller reads instead.
//!
//! Connections are made with `TCP_NODELAY`, which kube's own connector leaves off. Without it
//! every new connection's TLS handshake waited ~40 ms: the client's last handshake messages
//! went out as separate small writes, and Nagle's algorithm held the later ones until the API
//! server's delayed ACK of the first. A pipeline's first reconcile opens connections (the pool
//! below keeps few), so that wait was most of it: 113 ms for one pipeline on an idle cluster,
//! ~5 ms per request on a kept connection (docs/benchmarks.md).
//!
//! HTTP/2 is offered in the TLS handshake (ALPN `h2`, then `http/1.1`), as client-go does, and
//! the API server picks it. kube's own connector offers HTTP/1.1 only, where every request in
//! flight needs a connection of its own: in a 1,000-pipeline burst the operator opened ~2,000
//! TLS connections to an API server that was already its bottleneck. Over HTTP/2 the watches
//! and every request share one connection. A server that does not offer `h2` gets HTTP/1.1 as
//! before. The connection is pinged after [`PING_INTERVAL`] without traffic and dropped when a
//! ping goes unanswered for [`PING_TIMEOUT`], so a dead API server or network path is found in
//! under a minute instead of at the read timeout (kube's default: 295 s); every watch then
//! restarts on a new connection.
//!
//! Over HTTP/1.1 the connection pool keeps at most [`MAX_IDLE_CONNECTIONS`] idle connections.
//! hyper opens a connection for every request that finds none idle, and kept them all: a restart
//! on 1,000 pipelines ended with 24 connections to the API server, 7 of them watches (one per
//! watched kind) and 17 idle, each with its buffers and request channel (~40 KB).

use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::Builder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use kube::{Client, Config};
use tower::ServiceBuilder;
use tower::retry::RetryLayer;

/// Largest read buffer of one connection to the API server. hyper's floor is 8 KiB plus one
/// read; a watch event is a few KB.
pub const MAX_READ_BUFFER: usize = 64 * 1024;

/// Idle connections kept for reuse: enough for the reconcile slots (4 by default) and the
/// rollout driver's and autoscaler's writes. Busy connections (watches included) are not
/// limited; an idle connection beyond these is closed when its request completes.
pub const MAX_IDLE_CONNECTIONS: usize = 4;

/// An HTTP/2 connection without traffic for this long is pinged (client-go's default health
/// check waits 30 s as well).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// An unanswered ping closes the connection after this long (client-go: 15 s).
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds the client `config` describes (see the module docs for what differs from
/// `kube::Client::try_from`).
pub fn build(config: Config) -> Result<Client, kube::Error> {
    // kube is built without its proxy features, so its own client refuses a kubeconfig's
    // `proxy-url` too; connecting directly instead would bypass what the user asked for.
    if let Some(proxy) = &config.proxy_url {
        return Err(kube::Error::ProxyProtocolDisabled {
            proxy_url: Box::new(proxy.clone()),
            protocol_feature: if proxy.scheme_str() == Some("socks5") {
                "kube/socks5"
            } else {
                "kube/http-proxy"
            },
        });
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let mut connector = TimeoutConnector::new(https_connector(&config, http)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = Builder::new(TokioExecutor::new())
        .http1_max_buf_size(MAX_READ_BUFFER)
        .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

/// kube's rustls connector (its TLS settings: CA, client identity, `insecure-skip-tls-verify`,
/// `tls-server-name`), offering HTTP/2 as well as HTTP/1.1.
fn https_connector(
    config: &Config,
    http: HttpConnector,
) -> Result<HttpsConnector<HttpConnector>, kube::Error> {
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = name.clone().try_into().map_err(|e| {
                kube::Error::RustlsTls(kube::client::RustlsTlsError::InvalidServerName(e))
            })?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(builder.enable_all_versions().wrap_connector(http))
}

/// The client for the kubeconfig or in-cluster configuration, as `kube::Client::try_default`
/// finds it.
pub async fn infer() -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    build(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers each connection's first request with the next canned response, and returns the
    /// request heads it read.
    async fn serve(listener: TcpListener, responses: Vec<String>) -> Vec<String> {
        let mut heads = Vec::new();
        for response in responses {
            let Ok((mut sock, _)) = listener.accept().await else {
                break;
            };
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            heads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
        heads
    }

    fn response(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    const VERSION_JSON: &str = r#"{"major":"1","minor":"36","gitVersion":"v1.36.3","gitCommit":"x",
        "gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.26",
        "compiler":"gc","platform":"linux/amd64"}"#;

    /// Asks `/version` once, then four times at once, of a TLS server for the name `localhost`
    /// offering `alpn` (e.g. `h2`); returns the connections it accepted and the HTTP versions
    /// it saw. (Requests that start together before any connection exists each open one: the
    /// protocol is known only after the TLS handshake. The operator's first request is a lone
    /// one, before its watches start.)
    async fn five_requests_over_tls(alpn: &[&[u8]]) -> (usize, Vec<http::Version>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("a server config");
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("has an address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), versions.clone());
        let server = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(sock).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        seen.lock().expect("not poisoned").push(req.version());
                        async {
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    VERSION_JSON.as_bytes(),
                                )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        let mut config = Config::new(format!("https://{addr}").parse().expect("a URL"));
        config.root_cert = Some(vec![cert.cert.der().to_vec()]);
        // The certificate names `localhost`, the URL an address: the name must come from here.
        config.tls_server_name = Some("localhost".to_owned());
        let client = build(config).expect("builds");
        let answer = client.apiserver_version().await.expect("answered");
        assert_eq!(answer.git_version, "v1.36.3");
        let burst = futures::future::join_all((0..4).map(|_| client.apiserver_version())).await;
        for answer in burst {
            assert_eq!(answer.expect("answered").git_version, "v1.36.3");
        }
        server.abort();
        let seen = versions.lock().expect("not poisoned").clone();
        (accepted.load(Ordering::SeqCst), seen)
    }

    #[tokio::test]
    async fn requests_in_flight_together_share_one_http2_connection_when_the_server_offers_h2() {
        let (connections, versions) = five_requests_over_tls(&[b"h2", b"http/1.1"]).await;

        assert_eq!(versions, vec![http::Version::HTTP_2; 5]);
        assert_eq!(connections, 1, "four requests at once over one connection");
    }

    #[tokio::test]
    async fn a_server_without_h2_is_spoken_to_over_http1_with_a_connection_per_request_in_flight() {
        let (connections, versions) = five_requests_over_tls(&[b"http/1.1"]).await;

        assert_eq!(versions, vec![http::Version::HTTP_11; 5]);
        assert!(
            connections > 1,
            "HTTP/1.1 cannot carry four requests at once on one connection: {connections}"
        );
    }

    #[test]
    fn a_proxy_in_the_kubeconfig_is_refused_rather_than_bypassed() {
        let mut config = Config::new("https://10.0.0.1:6443".parse().expect("a URL"));
        config.proxy_url = Some("http://proxy.example:3128".parse().expect("a URL"));
        let Err(err) = build(config) else {
            panic!("a client that would bypass the proxy was built");
        };
        assert!(
            err.to_string().contains("proxy.example:3128"),
            "names the proxy: {err}"
        );
    }

    #[tokio::test]
    async fn the_client_sends_the_token_and_retries_a_503_like_kubes_own() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("has an address"));
        let server = tokio::spawn(serve(
            listener,
            vec![
                response("503 Service Unavailable", "{}"),
                response("200 OK", VERSION_JSON),
            ],
        ));
        let mut config = Config::new(url.parse().expect("a URL"));
        config.auth_info.token = Some("t0ken".to_owned().into());
        let client = build(config).expect("builds");

        let info = client
            .apiserver_version()
            .await
            .expect("answered after a retry");

        assert_eq!(info.git_version, "v1.36.3");
        let heads = server.await.expect("server ran");
        assert_eq!(heads.len(), 2, "one retry after the 503");
        for head in &heads {
            assert!(head.starts_with("GET /version "), "{head}");
            assert!(head.contains("authorization: Bearer t0ken"), "{head}");
        }
    }
}

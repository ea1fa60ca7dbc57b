//! Protocol selection per Service port, as Istio does it: `appProtocol` first, then the port
//! name's prefix before the first `-`. What neither declares is [`AppProtocol::Detect`]: the
//! connection's first bytes decide ([`sniff`]), HTTP/1.1 or the HTTP/2 preface, else TCP
//! after a short wait so server-first protocols are not held up.

use serde::Serialize;

use crate::config::model::ServicePort;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 towards the app (clients may still speak h2c to the agent).
    Http,
    /// HTTP/2 cleartext towards the app.
    Http2,
    /// gRPC: HTTP/2 towards the app, metrics labelled `grpc`.
    Grpc,
    /// Opaque bytes.
    Tcp,
    /// Undeclared: each connection's first bytes decide between HTTP and TCP.
    Detect,
}

impl AppProtocol {
    /// Istio's rules for one port.
    pub fn of(port: &ServicePort) -> AppProtocol {
        if let Some(p) = port.app_protocol.as_deref() {
            return Self::named(&p.to_ascii_lowercase()).unwrap_or(AppProtocol::Tcp);
        }
        port.name
            .as_deref()
            .map(str::to_ascii_lowercase)
            .and_then(|n| {
                // `grpc-web` is the one prefix with a dash of its own.
                if n == "grpc-web" || n.starts_with("grpc-web-") {
                    return Some(AppProtocol::Http);
                }
                Self::named(n.split('-').next().unwrap_or_default())
            })
            .unwrap_or(AppProtocol::Detect)
    }

    fn named(p: &str) -> Option<AppProtocol> {
        Some(match p {
            "http" | "http-web" | "grpc-web" => AppProtocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
            | "kubernetes.io/wss" => AppProtocol::Tcp,
            _ => return None,
        })
    }

    /// What an endpoint port selected by two Services declaring `self` and `other` is, for
    /// the destination side: the same protocol if they agree, HTTP if both declare some
    /// HTTP (the destination then speaks to the app as the peer spoke to it), else TCP.
    pub fn shared_with(self, other: AppProtocol) -> AppProtocol {
        match (self, other) {
            (a, b) if a == b => a,
            (a, b) if a.is_http() && b.is_http() => AppProtocol::Http,
            _ => AppProtocol::Tcp,
        }
    }

    /// The name the CLI shows.
    pub fn name(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
            AppProtocol::Detect => "auto",
        }
    }

    /// Always served as HTTP (declared).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }

    /// Whether the app is spoken to in HTTP/2.
    pub fn upstream_h2(self) -> bool {
        matches!(self, AppProtocol::Http2 | AppProtocol::Grpc)
    }
}

/// What a connection's first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    Http2,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Methods an HTTP/1.x request line may start with (RFC 9110 and WebDAV's common ones).
const METHODS: [&[u8]; 12] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PROPFIND ",
    b"MKCOL ",
    b"COPY ",
];
/// A request line longer than this is not taken for HTTP.
const MAX_REQUEST_LINE: usize = 8192;

/// Classifies the first bytes; `None`: not enough yet.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    let prefix_of_method = METHODS.iter().any(|m| m.starts_with(buf));
    if prefix_of_method {
        return None;
    }
    if !METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Sniffed::Tcp);
    }
    // A method: the request line must end in HTTP/1.0 or HTTP/1.1.
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = &buf[..end];
            let http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
            Some(if http1 { Sniffed::Http1 } else { Sniffed::Tcp })
        }
        None if buf.len() >= MAX_REQUEST_LINE => Some(Sniffed::Tcp),
        None => None,
    }
}

/// Peeks at a new connection's first bytes until [`classify`] decides, or `wait` passes
/// (nothing or too little sent: a server-first protocol, so TCP). Nothing is consumed.
pub async fn sniff(stream: &tokio::net::TcpStream, wait: std::time::Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 512];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            // EOF, an error, or the wait is over: not HTTP.
            _ => return Sniffed::Tcp,
        };
        if let Some(v) = classify(&buf[..n]) {
            return v;
        }
        if n == buf.len() && buf.len() < MAX_REQUEST_LINE {
            buf.resize(buf.len() * 2, 0);
        } else if n == seen {
            // Nothing new since the last look: wait a little for the rest.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        seen = n;
        if tokio::time::Instant::now() >= deadline {
            return Sniffed::Tcp;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::TargetPort;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Sniffed::Http1)
        );
        assert_eq!(classify(b"POST /x HTTP/1.0\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None, "the preface so far");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /a"), None, "the request line so far");
        assert_eq!(classify(b"GET / FTP\r\n"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"hello\n"), Some(Sniffed::Tcp));
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Sniffed::Tcp),
            "a TLS ClientHello"
        );
        assert_eq!(classify(b"*3\r\n$3\r\nSET"), Some(Sniffed::Tcp), "redis");
        let long = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(classify(&long), Some(Sniffed::Tcp));
    }

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port: 80,
            target_port: TargetPort::Number(8080),
            app_protocol: app.map(str::to_string),
        }
    }

    #[test]
    fn app_protocol_then_name_prefix_then_tcp() {
        use AppProtocol as P;
        let cases = [
            (Some("http"), None, P::Http),
            (Some("http-web"), None, P::Http),
            (Some("HTTP2-api"), None, P::Http2),
            (Some("grpc"), None, P::Grpc),
            (Some("grpc-web"), None, P::Http),
            (Some("grpc-web-x"), None, P::Http),
            (Some("tcp-db"), None, P::Tcp),
            (Some("https"), None, P::Tcp),
            (Some("web"), None, P::Detect),
            (None, None, P::Detect),
            // appProtocol wins over the name.
            (Some("tcp"), Some("http"), P::Http),
            (Some("http"), Some("kubernetes.io/h2c"), P::Http2),
            (Some("http"), Some("grpc"), P::Grpc),
            (Some("http"), Some("mysql"), P::Tcp),
            (Some("http"), Some("something-else"), P::Tcp),
        ];
        for (name, app, want) in cases {
            assert_eq!(AppProtocol::of(&port(name, app)), want, "{name:?} {app:?}");
        }
    }
}

#[cfg(test)]
mod sniff_tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn silent_clients_are_tcp_after_the_wait_and_talkers_are_classified() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let start = Instant::now();
        assert_eq!(
            sniff(&server, Duration::from_millis(100)).await,
            Sniffed::Tcp
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
            "{waited:?}"
        );

        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        talker.write_all(b"GET / HT").await.unwrap();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            talker.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            talker
        });
        assert_eq!(
            sniff(&server, Duration::from_millis(500)).await,
            Sniffed::Http1
        );
        let _talker = late.await.unwrap();
    }
}

//! Protocol selection per Service port, as Istio does it: `appProtocol` first, then the port
//! name's prefix before the first `-`. What neither declares stays TCP for now (Istio would
//! sniff the first bytes; see README, Limits).

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
            .unwrap_or(AppProtocol::Tcp)
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

    /// The name the CLI shows.
    pub fn name(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }

    pub fn is_http(self) -> bool {
        self != AppProtocol::Tcp
    }

    /// Whether the app is spoken to in HTTP/2.
    pub fn upstream_h2(self) -> bool {
        matches!(self, AppProtocol::Http2 | AppProtocol::Grpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::TargetPort;

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
            (Some("web"), None, P::Tcp),
            (None, None, P::Tcp),
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

//! The benchmark's testbed: its manifest, the servers in the server pods, and what /proc says
//! about the agents and the machine.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_testbed::{PodProcess, Testbed};

/// Enrolled namespace: the mesh client and the servers.
pub const MESH_NS: &str = "bench";
/// Unlabelled namespace: the direct client.
pub const DIRECT_NS: &str = "bench-direct";
pub const CLIENT: &str = "client";
pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// The Services' second port to the same web server, named `http`: the agents' HTTP path.
/// `HTTP_PORT` on the Service is named `tcp-web`: L4.
pub const MESH_HTTP_PORT: u16 = 8081;
/// The web server's second listening port, the target of the Service port named `tcp-web`.
/// The `http` Service port has the pod's `HTTP_PORT` to itself: a pod port that some Service
/// also declares TCP is relayed as bytes by the server's agent, so the client's agent would
/// not share HTTP/2 connections to it, and `--http` would not measure the HTTP path users of
/// a plain `http` port get.
pub const TCP_WEB_PORT: u16 = 8083;
/// The server pods' HTTP/2 port (h2c with prior knowledge), a Service port named `http2`.
pub const H2C_PORT: u16 = 8082;
/// The server pods' gRPC port (`mesh-testapp grpc-echo`), a Service port named `grpc`.
pub const GRPC_PORT: u16 = 50051;
/// The node of both clients; its agent is the one that proxies the mesh traffic.
pub const CLIENT_NODE: &str = "node-1";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A server pod: `bench/<name>` on `node`, selected by Service `bench/<name>`.
pub struct ServerPod {
    pub name: &'static str,
    pub node: &'static str,
}

pub const SERVERS: [ServerPod; 2] = [
    ServerPod {
        name: "server-local",
        node: "node-1",
    },
    ServerPod {
        name: "server-remote",
        node: "node-2",
    },
];

fn pod_yaml(out: &mut String, ns: &str, name: &str, node: &str, ports: bool) {
    let ports = if ports {
        format!(
            "\n    ports: [{{name: http, containerPort: {HTTP_PORT}}}, {{name: tcp-web, containerPort: \
             {TCP_WEB_PORT}}}, {{name: iperf, containerPort: \
             {IPERF_PORT}}}, {{name: h2c, containerPort: {H2C_PORT}}}, {{name: grpc, \
             containerPort: {GRPC_PORT}}}]"
        )
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         labels: {{app: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: app\n    \
         image: bench{ports}\n"
    );
}

/// The testbed's manifest: two namespaces, the two clients on node-1, one server per node and
/// a Service per server.
pub fn manifest() -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESH_NS}\n  \
         labels: {{nodemesh.io/enabled: \"true\"}}\n---\napiVersion: v1\nkind: Namespace\n\
         metadata:\n  name: {DIRECT_NS}\n"
    );
    pod_yaml(&mut out, MESH_NS, CLIENT, CLIENT_NODE, false);
    pod_yaml(&mut out, DIRECT_NS, CLIENT, CLIENT_NODE, false);
    for s in &SERVERS {
        pod_yaml(&mut out, MESH_NS, s.name, s.node, true);
        // The direct baseline has its own servers outside the mesh: a meshed server's inbound
        // connections all pass through its agent, even from clients outside the mesh.
        pod_yaml(&mut out, DIRECT_NS, s.name, s.node, true);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {MESH_NS}\n\
             spec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: tcp-web, port: {HTTP_PORT}, \
             targetPort: tcp-web}}\n  - {{name: http, port: {MESH_HTTP_PORT}, targetPort: http}}\n  \
             - {{name: iperf, port: {IPERF_PORT}, targetPort: iperf}}\n  \
             - {{name: http2, port: {H2C_PORT}, targetPort: h2c}}\n  \
             - {{name: grpc, port: {GRPC_PORT}, targetPort: grpc}}\n",
            name = s.name
        );
    }
    out
}

/// Which HTTP server the server pods run.
pub enum HttpServer {
    Nginx(PathBuf),
    Testapp(PathBuf),
}

impl HttpServer {
    /// nginx if installed, else mesh-testapp's HTTP server.
    pub fn pick(testapp: PathBuf) -> Self {
        ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .map_or(Self::Testapp(testapp), Self::Nginx)
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Nginx(bin) => format!(
                "{} (1 worker process, access_log off, keepalive_requests 1000000, a static \
                 612-byte index.html)",
                super::tools::version(&bin.to_string_lossy(), "-v")
            ),
            Self::Testapp(_) => "mesh-testapp http (release build; tokio, 2 worker threads; \
                 nginx was not installed)"
                .to_string(),
        }
    }
}

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  \
         access_log off;\n  default_type text/html;\n  keepalive_requests 1000000;\n  \
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  \
         scgi_temp_path {d}/tmp/scgi;\n  server {{\n    listen {HTTP_PORT} default_server;\n    \
         listen {TCP_WEB_PORT};\n    \
         root {d}/www;\n    location / {{ index index.html; }}\n  }}\n  server {{\n    \
         listen {H2C_PORT} http2;\n    root {d}/www;\n    location / {{ index index.html; }}\n  \
         }}\n}}\n"
    )
}

/// Starts iperf3 and the HTTP server in every server pod (with `h2`, also an HTTP/2 server
/// on [`H2C_PORT`] and `testapp grpc-echo` on [`GRPC_PORT`]) and waits until they accept
/// connections. The returned guards stop them on drop.
pub fn start_servers(
    tb: &Testbed,
    http: &HttpServer,
    testapp: &Path,
    h2: bool,
) -> Result<Vec<PodProcess>> {
    let mut procs = Vec::new();
    for (ns, s) in [MESH_NS, DIRECT_NS]
        .into_iter()
        .flat_map(|ns| SERVERS.iter().map(move |s| (ns, s)))
    {
        let pod = format!("{ns}/{}", s.name);
        let port = IPERF_PORT.to_string();
        let mut iperf = tb.spawn_in_pod(&pod, "iperf3", ["-s", "-p", &port, "--forceflush"])?;
        iperf
            .wait_for_line("Server listening", READY_TIMEOUT)
            .with_context(|| format!("iperf3 -s in pod {pod}"))?;
        procs.push(iperf);
        // The ports to wait for, each with the index in `procs` of the process serving it.
        let mut serving: Vec<(usize, u16)> = Vec::new();
        match http {
            HttpServer::Nginx(bin) => {
                let dir = tb.state_dir().join("bench").join(ns).join(s.name);
                for sub in ["tmp", "www"] {
                    std::fs::create_dir_all(dir.join(sub))
                        .with_context(|| format!("creating {}", dir.join(sub).display()))?;
                }
                let page = format!("<!DOCTYPE html>\n<html>{}</html>\n", "x".repeat(590));
                let files = [
                    (dir.join("www/index.html"), page),
                    (dir.join("nginx.conf"), nginx_conf(&dir)),
                ];
                for (path, text) in files {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                let (conf, err) = (dir.join("nginx.conf"), dir.join("error.log"));
                let args = [
                    "-p".as_ref(),
                    dir.as_os_str(),
                    "-c".as_ref(),
                    conf.as_os_str(),
                    "-e".as_ref(),
                    err.as_os_str(),
                ];
                procs.push(tb.spawn_in_pod(&pod, bin, args)?);
                serving.push((procs.len() - 1, HTTP_PORT));
                serving.push((procs.len() - 1, TCP_WEB_PORT));
                if h2 {
                    serving.push((procs.len() - 1, H2C_PORT));
                }
            }
            HttpServer::Testapp(bin) => {
                // mesh-testapp http speaks HTTP/1.1 and h2c (hyper-util's auto builder).
                let ports = if h2 {
                    &[HTTP_PORT, TCP_WEB_PORT, H2C_PORT][..]
                } else {
                    &[HTTP_PORT, TCP_WEB_PORT][..]
                };
                for &port in ports {
                    let listen = format!("0.0.0.0:{port}");
                    let args = ["http", "--listen", &listen, "--service", s.name];
                    let mut p = tb.spawn_in_pod(&pod, bin, args)?;
                    p.wait_for_line("listening", READY_TIMEOUT)
                        .with_context(|| format!("mesh-testapp http in pod {pod}"))?;
                    procs.push(p);
                    serving.push((procs.len() - 1, port));
                }
            }
        }
        if h2 {
            let listen = format!("0.0.0.0:{GRPC_PORT}");
            let mut p = tb.spawn_in_pod(&pod, testapp, ["grpc-echo", "--listen", &listen])?;
            p.wait_for_line("listening", READY_TIMEOUT)
                .with_context(|| format!("mesh-testapp grpc-echo in pod {pod}"))?;
            procs.push(p);
            serving.push((procs.len() - 1, GRPC_PORT));
        }
        let ip = tb.pod_ip(ns, s.name)?;
        for (i, port) in serving {
            wait_tcp(tb, &mut procs[i], SocketAddr::from((ip, port)))
                .with_context(|| format!("the server on port {port} of pod {pod}"))?;
        }
    }
    Ok(procs)
}

/// Waits until `addr` accepts a TCP connection from the direct client's (uncaptured)
/// namespace, failing early if `server` exits.
fn wait_tcp(tb: &Testbed, server: &mut PodProcess, addr: SocketAddr) -> Result<()> {
    let until = Instant::now() + READY_TIMEOUT;
    let direct = format!("{DIRECT_NS}/{CLIENT}");
    loop {
        if let Some(st) = server.child_mut().try_wait()? {
            bail!("exited ({st}) before accepting connections on {addr}");
        }
        let probe = tb.in_pod_netns(&direct, move || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())
        })?;
        if probe {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!("{addr} accepted no connection within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent of the client node reports the mesh client as enrolled.
pub fn wait_enrolled(tb: &Testbed) -> Result<()> {
    let until = Instant::now() + READY_TIMEOUT;
    loop {
        let (code, body) = tb.admin_get(CLIENT_NODE, "/workloads")?;
        let list: Vec<serde_json::Value> = if code == 200 {
            serde_json::from_str(&body).context("/workloads is not a JSON list")?
        } else {
            Vec::new()
        };
        let enrolled = list
            .iter()
            .any(|w| w["namespace"] == MESH_NS && w["name"] == CLIENT && w["state"] == "enrolled");
        if enrolled {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!(
                "the agent of {CLIENT_NODE} did not enroll {MESH_NS}/{CLIENT} within \
                 {READY_TIMEOUT:?}; /workloads answered {code}: {body}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connections the agent of `node` has accepted so far (`/stats` proxy.accepted).
pub fn accepted(tb: &Testbed, node: &str) -> Result<u64> {
    let (code, body) = tb.admin_get(node, "/stats")?;
    if code != 200 {
        bail!("/stats of the agent of {node} answered {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("/stats is not JSON")?;
    v["proxy"]["accepted"]
        .as_u64()
        .with_context(|| format!("no proxy.accepted in /stats of {node}: {body}"))
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_seconds(pid: u32, ticks_per_s: f64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces): state is field 3; utime and
    // stime are fields 14 and 15.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .with_context(|| format!("unexpected {path}: {text}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let v = fields
            .get(i)
            .with_context(|| format!("{path} has too few fields"))?;
        Ok(v.parse::<u64>()
            .with_context(|| format!("{path}: field {} is {v:?}", i + 3))? as f64)
    };
    Ok((tick(11)? + tick(12)?) / ticks_per_s)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Resident set size (VmRSS) of a process now, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    mesh_testbed::status_kib(&pid.to_string(), "VmRSS")
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    mesh_testbed::status_kib(&pid.to_string(), "VmHWM")
}

/// Resets a process's peak RSS to its current RSS (`echo 5 > /proc/<pid>/clear_refs`).
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// The machine, for the report.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_gib: f64,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, m)| m.trim().to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_string(), |k| k.trim().to_string());
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel,
            mem_gib: mem_kib / (1024.0 * 1024.0),
        }
    }
}

/// /proc/loadavg's three load averages.
pub fn loadavg() -> Result<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("unexpected /proc/loadavg: {text}"),
    }
}

/// The destination a client uses: the IP of the server pod outside the mesh (direct) or the
/// meshed server's Service ClusterIP (mesh).
pub fn targets(tb: &Testbed, server: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    Ok((
        tb.pod_ip(DIRECT_NS, server)?,
        tb.service_ip(MESH_NS, server)?,
    ))
}

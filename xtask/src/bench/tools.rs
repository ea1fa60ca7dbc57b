//! The load generators: running iperf3, wrk and h2load with a deadline, and parsing what they
//! print.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Output of a command that exited 0.
pub struct Captured {
    pub stdout: String,
}

/// Runs `cmd` with stdout and stderr captured; kills it if it is still running after
/// `timeout`. Fails unless it exits 0 in time (the error shows stderr and stdout).
pub fn run_bounded(mut cmd: Command, what: &str, timeout: Duration) -> Result<Captured> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break Some(st);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        None => bail!(
            "{what} did not finish within {timeout:?}; killed it (stderr: {})",
            stderr.trim()
        ),
        Some(st) if !st.success() => bail!(
            "{what} failed ({st}): {}\n{}",
            stderr.trim(),
            tail(&stdout, 20)
        ),
        Some(_) => Ok(Captured { stdout }),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Receiver-side throughput of an `iperf3 -J` client run, in bits per second.
pub fn parse_iperf3(json: &str) -> Result<f64> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("iperf3 -J did not print JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 reported an error: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    if !(bps.is_finite() && bps > 0.0) {
        bail!("iperf3 measured no throughput ({bps} bit/s)");
    }
    Ok(bps)
}

/// What one `wrk --latency` or h2load run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadResult {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Socket errors, failed requests and non-2xx/3xx responses, as the tool words them
    /// (empty if none).
    pub errors: Vec<String>,
}

/// A wrk duration such as `38.00us`, `1.25ms` or `2.00s`, in microseconds.
fn parse_latency(s: &str) -> Result<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("latency {s:?} has no unit (us, ms, s, m)");
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("latency {s:?} is not a number"))?;
    Ok(v * scale)
}

/// Parses the text `wrk --latency` prints.
pub fn parse_wrk(text: &str) -> Result<LoadResult> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            let v = v.trim();
            rps = Some(
                v.parse::<f64>()
                    .with_context(|| format!("Requests/sec {v:?} is not a number"))?,
            );
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = Some(parse_latency(v).context("wrk's 50% latency line")?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = Some(parse_latency(v).context("wrk's 99% latency line")?);
        } else if line.starts_with("Socket errors:") || line.starts_with("Non-2xx or 3xx") {
            errors.push(line.to_string());
        }
    }
    match (rps, p50, p99) {
        (Some(rps), Some(p50_us), Some(p99_us)) if rps > 0.0 => Ok(LoadResult {
            rps,
            p50_us,
            p99_us,
            errors,
        }),
        (Some(_), Some(_), Some(_)) => bail!("wrk completed no requests:\n{text}"),
        _ => bail!("wrk's output lacks Requests/sec or the 50%/99% latency lines:\n{text}"),
    }
}

/// Parses what h2load prints (`finished in 5.00s, 1234.50 req/s, ...`, the `requests:` and
/// `status codes:` lines) and its `--log-file` (one request per line: start time, status,
/// microseconds to the end of the response), from which the percentiles come: h2load itself
/// prints only min/max/mean/sd.
pub fn parse_h2load(text: &str, log: &str) -> Result<LoadResult> {
    let mut rps = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let v = rest
                .split(", ")
                .find_map(|f| f.strip_suffix(" req/s"))
                .with_context(|| format!("no req/s in h2load's line {line:?}"))?;
            rps = Some(
                v.parse::<f64>()
                    .with_context(|| format!("h2load's req/s {v:?} is not a number"))?,
            );
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, F failed, E errored, T timeout"
            let bad: u64 = rest
                .split(", ")
                .filter(|f| {
                    ["failed", "errored", "timeout"]
                        .iter()
                        .any(|k| f.ends_with(k))
                })
                .filter_map(|f| f.split_whitespace().next()?.parse::<u64>().ok())
                .sum();
            if bad > 0 {
                errors.push(line.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            let non_2xx = rest
                .split(", ")
                .filter(|f| !f.ends_with("2xx"))
                .any(|f| f.split_whitespace().next() != Some("0"));
            if non_2xx {
                errors.push(line.to_string());
            }
        }
    }
    let rps = rps.with_context(|| format!("h2load printed no `finished in` line:\n{text}"))?;
    let mut durations = Vec::new();
    for (n, line) in log.lines().enumerate() {
        let mut cols = line.split('\t');
        let (Some(_start), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            bail!(
                "h2load's log file, line {}: {line:?} has fewer than 3 columns",
                n + 1
            );
        };
        let ok = status.parse::<i32>().is_ok_and(|s| (200..300).contains(&s));
        if ok {
            let us: f64 = us
                .trim()
                .parse()
                .with_context(|| format!("h2load's log file, line {}: {us:?}", n + 1))?;
            durations.push(us);
        }
    }
    if rps <= 0.0 || durations.is_empty() {
        bail!("h2load completed no successful requests:\n{text}");
    }
    durations.sort_by(f64::total_cmp);
    Ok(LoadResult {
        rps,
        p50_us: percentile(&durations, 50.0),
        p99_us: percentile(&durations, 99.0),
        errors,
    })
}

/// Nearest-rank percentile of sorted, non-empty `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `<program> <version>`: the first word with a digit that `<program> <flag>` prints (on
/// stdout or stderr), without a leading `<program>/`; e.g. `nginx 1.22.1`.
pub fn version(program: &str, flag: &str) -> String {
    let name = program.rsplit('/').next().unwrap_or(program);
    let Ok(o) = Command::new(program)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
    else {
        return format!("{name} (version unknown)");
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    version_word(&text).map_or_else(
        || format!("{name} (version unknown)"),
        |v| format!("{name} {v}"),
    )
}

fn version_word(text: &str) -> Option<&str> {
    let word = text
        .lines()
        .next()?
        .split_whitespace()
        .find(|w| w.bytes().any(|b| b.is_ascii_digit()))?;
    Some(
        word.split_once('/')
            .filter(|(p, _)| !p.starts_with("debian"))
            .map_or(word, |(_, v)| v),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://10.244.1.3:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    41.35us   20.99us   1.81ms   97.78%
    Req/Sec    23.26k     1.09k   24.57k    80.39%
  Latency Distribution
     50%   38.00us
     75%   41.00us
     90%   45.00us
     99%    1.20ms
  118135 requests in 5.10s, 17.01MB read
Requests/sec:  23163.66
Transfer/sec:      3.34MB
";

    #[test]
    fn wrk_output() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.rps, 23163.66);
        assert_eq!(r.p50_us, 38.0);
        assert_eq!(r.p99_us, 1200.0);
        assert!(r.errors.is_empty());
    }

    #[test]
    fn wrk_errors_and_units() {
        let text = WRK.replace("1.20ms", "2.00s").replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        let r = parse_wrk(&text).unwrap();
        assert_eq!(r.p99_us, 2e6);
        assert_eq!(
            r.errors,
            ["Socket errors: connect 0, read 3, write 0, timeout 0"]
        );
        assert!(parse_wrk("unable to connect to 10.0.0.1:80 Connection refused").is_err());
        assert!(parse_latency("12").is_err());
        assert_eq!(parse_latency("1.5m").unwrap(), 90e6);
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
finished in 5.00s, 10530.40 req/s, 7.21MB/s
requests: 52652 total, 52684 started, 52652 done, 52652 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 52652 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 36.05MB (37802536) total, 618.40KB (633236) headers (space savings 95.12%), 31.66MB (33200000) data
                     min         max         mean         sd        +/- sd
time for request:      247us     10.58ms      2.98ms       956us    71.13%
";

    #[test]
    fn h2load_output_and_log() {
        let log: String = (1..=100)
            .map(|i| format!("1764201600000000\t200\t{}\n", i * 10))
            .collect();
        let r = parse_h2load(H2LOAD, &log).unwrap();
        assert_eq!(r.rps, 10530.40);
        assert_eq!((r.p50_us, r.p99_us), (500.0, 990.0));
        assert!(r.errors.is_empty());
        // Failed streams (-1) and non-2xx answers are not latencies; they are errors.
        let text = H2LOAD
            .replace("0 failed", "3 failed")
            .replace("0 5xx", "7 5xx");
        let log = format!("{log}1764201600000000\t-1\t5\n1764201600000000\t503\t1\n");
        let r = parse_h2load(&text, &log).unwrap();
        assert_eq!(r.p50_us, 500.0);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert!(parse_h2load("connect: Connection refused", "").is_err());
        assert!(parse_h2load(H2LOAD, "").is_err());
        assert!(parse_h2load(H2LOAD, "1\t200").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(
            version_word("nginx version: nginx/1.22.1\n"),
            Some("1.22.1")
        );
        assert_eq!(
            version_word("iperf 3.12 (cJSON 1.7.15)\nLinux"),
            Some("3.12")
        );
        let wrk = "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer";
        assert_eq!(version_word(wrk), Some("debian/4.1.0-3+b2"));
        assert_eq!(version_word(""), None);
    }

    #[test]
    fn iperf3_json() {
        let ok = r#"{"end": {"sum_sent": {"bits_per_second": 2e10},
            "sum_received": {"bits_per_second": 1.8e10}}}"#;
        assert_eq!(parse_iperf3(ok).unwrap(), 1.8e10);
        let err = r#"{"start": {}, "error": "unable to connect to server: Connection refused"}"#;
        let e = parse_iperf3(err).unwrap_err().to_string();
        assert!(e.contains("Connection refused"), "{e}");
        assert!(parse_iperf3("not json").is_err());
    }
}

//! The fast path's control: the start-up self-test that must pass before it is turned on, the
//! switch (flag and admin API) and the state `status` and `check` report.
//!
//! The eBPF side (`mesh-ebpf/src/fast_path.rs`) puts both ends of each app-to-agent loopback
//! connection of an enrolled pod into a SOCKHASH and moves every message straight to the
//! peer socket. It runs for pods only while FAST_PATH_ON holds 1, which the agent writes only
//! after the self-test has passed on this kernel.
//!
//! The self-test uses the real programs and maps: in a private network namespace it enrolls
//! that namespace with the self-test flag (the fast path runs there even while it is off for
//! pods), opens a 127.0.0.1:15001 connection exactly like a captured app's, checks that both
//! ends entered the SOCKHASH, exchanges data both ways (a small message, one large write each
//! way sized to the budget, 64 writes of 1 to 64 bytes, a half-close with a blocking read
//! waiting across it), checks every byte and that every message was redirected and none took
//! the stack, then checks both ends left the map.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData};
use mesh_common::{
    ENROLLED_SELF_TEST, EnrolledPod, FAST_PATH_BUDGET_INDEX, FAST_PATH_ON_INDEX, SockKey, names,
    ports,
};
use serde::Serialize;
use tracing::{info, warn};

use super::{CaptureError, MapReader, map_err, open_pinned};

/// `--fast-path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FastPathMode {
    /// Off: every hop goes through the TCP/IP stack.
    Off,
    /// On if the start-up self-test passes on this kernel, all of it.
    On,
    /// On even if this kernel fails the self-test's blocking-read check (a blocking read on
    /// an accelerated socket returns EAGAIN early when the socket is woken without data):
    /// only for nodes whose apps all use non-blocking sockets (Go, Rust async, Node, Envoy,
    /// nginx, Java NIO). The data checks must still pass.
    Force,
}

/// Whether the fast path is on, and why; shown by `status` and `/fast_path`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FastPathState {
    pub on: bool,
    pub reason: String,
    /// The start-up self-test: `passed`, `failed` or `not run`.
    pub self_test: String,
    /// Why the self-test failed, if it did.
    pub self_test_error: Option<String>,
    /// Bytes one socket may move through the fast path before it goes on over the stack.
    pub budget_bytes: u32,
}

/// The switch: FAST_PATH_ON plus what `status` says about it. Control plane only.
pub struct FastPath {
    /// None if the pinned map could not be opened: then the fast path stays off.
    on_map: Option<Mutex<Array<MapData, u32>>>,
    state: Mutex<FastPathState>,
    /// The self-test passed (or `force` accepted its one known kernel flaw): only then may
    /// the fast path be turned on.
    usable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("the fast path cannot be turned on: {0}")]
    Unusable(String),
    #[error(transparent)]
    Map(#[from] CaptureError),
}

/// `--fast-path*` settings.
#[derive(Clone, Copy, Debug)]
pub struct FastPathConfig {
    pub mode: FastPathMode,
    /// Bytes one socket may redirect before it is pinned to the stack.
    pub budget_bytes: u32,
    /// Testing: the self-test's sockets are never accelerated, so it fails.
    pub inject_self_test_failure: bool,
}

impl FastPath {
    /// Writes "off" to FAST_PATH_ON first (a previous agent may have left it on) and the
    /// budget, then runs the self-test unless the mode is off, and turns the fast path on if
    /// it passed.
    pub fn start(pin_dir: &Path, cfg: FastPathConfig) -> Self {
        let on_map = match open_pinned::<Array<MapData, u32>>(pin_dir, names::MAP_FAST_PATH_ON) {
            Ok(m) => m,
            Err(e) => {
                // The map is part of the object Capture::start just loaded; without it nothing
                // can turn the fast path on, which is the safe state.
                warn!(error = %e, "fast path control map unavailable; fast path off");
                return FastPath::unavailable(format!("control map unavailable: {e}"));
            }
        };
        let mut fp = FastPath {
            on_map: Some(Mutex::new(on_map)),
            state: Mutex::new(FastPathState {
                budget_bytes: cfg.budget_bytes,
                ..FastPathState::default()
            }),
            usable: false,
        };
        if let Err(e) = fp
            .write(FAST_PATH_ON_INDEX, 0)
            .and_then(|()| fp.write(FAST_PATH_BUDGET_INDEX, cfg.budget_bytes))
        {
            warn!(error = %e, "cannot reset FAST_PATH_ON; fast path off");
            fp.update(
                false,
                format!("cannot write FAST_PATH_ON: {e}"),
                "not run",
                None,
            );
            return fp;
        }
        if cfg.mode == FastPathMode::Off {
            fp.update(
                false,
                "turned off with --fast-path=off".into(),
                "not run",
                None,
            );
            info!("fast path off (--fast-path=off): app-to-agent hops use the TCP/IP stack");
            return fp;
        }
        let result = self_test(pin_dir, cfg.budget_bytes, cfg.inject_self_test_failure);
        let (reason, self_test, error) = match &result {
            Ok(report) => {
                info!(
                    messages = report.redirected,
                    bytes = report.bytes,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "fast path self-test passed"
                );
                ("self-test passed".to_string(), "passed", None)
            }
            Err(e @ SelfTestError::BlockingReadEagain { .. })
                if cfg.mode == FastPathMode::Force =>
            {
                warn!(error = %e, "fast path self-test: this kernel breaks blocking reads on accelerated sockets; on anyway (--fast-path=force): apps with blocking sockets may see EAGAIN");
                (
                    "forced on (--fast-path=force) despite the self-test".to_string(),
                    "failed",
                    Some(e.to_string()),
                )
            }
            Err(e) => {
                warn!(error = %e, "fast path self-test failed; fast path stays off, the mesh works without it");
                fp.update(
                    false,
                    "self-test failed".into(),
                    "failed",
                    Some(e.to_string()),
                );
                return fp;
            }
        };
        fp.usable = true;
        match fp.write(FAST_PATH_ON_INDEX, 1) {
            Ok(()) => {
                info!(budget_bytes = cfg.budget_bytes, "fast path on");
                fp.update(true, reason, self_test, error);
            }
            Err(e) => {
                warn!(error = %e, "cannot turn the fast path on");
                fp.update(
                    false,
                    format!("cannot write FAST_PATH_ON: {e}"),
                    self_test,
                    error,
                );
            }
        }
        fp
    }

    fn unavailable(reason: String) -> FastPath {
        FastPath {
            on_map: None,
            state: Mutex::new(FastPathState {
                on: false,
                reason,
                self_test: "not run".into(),
                self_test_error: None,
                budget_bytes: 0,
            }),
            usable: false,
        }
    }

    pub fn state(&self) -> FastPathState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Turns the fast path on or off at runtime. Off takes effect for the next message of
    /// every connection (each then stays on the stack); on applies to connections opened
    /// from then on. On is refused unless the self-test passed.
    pub fn set(&self, on: bool) -> Result<FastPathState, FastPathError> {
        if on && !self.usable {
            let s = self.state();
            return Err(FastPathError::Unusable(
                s.self_test_error.unwrap_or(s.reason),
            ));
        }
        self.write(FAST_PATH_ON_INDEX, u32::from(on))?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.on = on;
        state.reason = if on {
            "turned on through the admin API".into()
        } else {
            "turned off through the admin API".into()
        };
        info!(on, "fast path switched through the admin API");
        Ok(state.clone())
    }

    fn write(&self, index: u32, value: u32) -> Result<(), CaptureError> {
        let Some(map) = &self.on_map else {
            return Err(CaptureError::Missing(names::MAP_FAST_PATH_ON));
        };
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        map.set(index, value, 0)
            .map_err(map_err(names::MAP_FAST_PATH_ON))
    }

    fn update(&self, on: bool, reason: String, self_test: &str, error: Option<String>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.on = on;
        state.reason = reason;
        state.self_test = self_test.to_string();
        state.self_test_error = error;
    }
}

/// Why `mesh-agent check` could not run or pass the self-test.
#[derive(Debug, thiserror::Error)]
pub enum FastPathCheckError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("cannot find this process's cgroup v2 directory (/proc/self/cgroup)")]
    NoCgroup,
    #[error(transparent)]
    SelfTest(#[from] SelfTestError),
}

/// What a passed self-test measured.
#[derive(Clone, Debug)]
pub struct SelfTestReport {
    /// Messages sk_msg redirected.
    pub redirected: u64,
    /// Bytes exchanged and checked.
    pub bytes: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("creating a private network namespace (unshare CLONE_NEWNET): {0}")]
    Netns(io::Error),
    #[error("bringing lo up in the private namespace: {0}")]
    Loopback(io::Error),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("eBPF maps: {0}")]
    Map(#[from] CaptureError),
    #[error(
        "the loopback connection never entered the SOCKHASH within {0:?} (sock_ops did not insert it)"
    )]
    NotInserted(Duration),
    #[error("{what}: {got} bytes arrived, {expected} expected, first difference at byte {at}")]
    Corrupt {
        what: &'static str,
        expected: usize,
        got: usize,
        at: usize,
    },
    #[error(
        "{stack} message(s) took the TCP/IP stack and {redirected} were redirected: the redirect does not work here"
    )]
    NotRedirected { redirected: u64, stack: u64 },
    #[error(
        "a blocking read on an accelerated socket returned EAGAIN after {after:?}, when the ACK of its own half-close woke it without data (this kernel's tcp_bpf recvmsg): applications using blocking sockets would fail"
    )]
    BlockingReadEagain { after: Duration },
    #[error("the closed sockets were still in the SOCKHASH after {0:?}")]
    Leaked(Duration),
    #[error("the self-test thread panicked")]
    Panicked,
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> SelfTestError {
    move |source| SelfTestError::Io { step, source }
}

/// Runs the self-test on a thread of its own (it leaves the agent's network namespace).
/// `inject_failure` enrolls the private namespace without the self-test flag, so the programs
/// never insert its sockets: the way a kernel without working sock_ops/sk_msg fails.
pub fn self_test(
    pin_dir: &Path,
    budget: u32,
    inject_failure: bool,
) -> Result<SelfTestReport, SelfTestError> {
    let result = std::thread::scope(|s| {
        s.spawn(|| self_test_in_private_netns(pin_dir, budget, inject_failure))
            .join()
            .unwrap_or(Err(SelfTestError::Panicked))
    });
    // The test's few MiB of buffers were freed on a thread of their own; glibc keeps such a
    // thread's arena mapped (about 3 MB of RSS for the agent's lifetime) unless told.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    result
}

const SMALL: &[u8] = b"ping";
/// The large writes: as much as the budget leaves room for, at most 1 MiB and 512 KiB.
const DOWN_MAX: usize = 1 << 20;
const UP_MAX: usize = 512 << 10;
const SPLIT_WRITES: usize = 64;
/// Smallest budget the self-test (and `--fast-path-budget`) accepts.
pub const MIN_BUDGET: u32 = 64 << 10;
/// `--fast-path-budget`'s default, and the budget `mesh-agent check` tests with.
pub const DEFAULT_BUDGET: u32 = 4 << 20;
/// How long the server waits after the half-close before answering: the client is blocked in
/// read() meanwhile, and the ACK of its FIN wakes it without data.
const LATE_REPLY: Duration = Duration::from_millis(200);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAP_WAIT: Duration = Duration::from_secs(1);

fn self_test_in_private_netns(
    pin_dir: &Path,
    budget: u32,
    inject_failure: bool,
) -> Result<SelfTestReport, SelfTestError> {
    let started = Instant::now();
    // SAFETY: plain syscall; it affects only this thread, which ends after the test.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(SelfTestError::Netns(io::Error::last_os_error()));
    }
    loopback_up().map_err(SelfTestError::Loopback)?;
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports::OUTBOUND))
        .map_err(io_err("listening on 127.0.0.1:15001"))?;
    let netns = super::netns::netns_cookie(&listener).map_err(io_err("SO_NETNS_COOKIE"))?;

    let mut enrolled: aya::maps::HashMap<MapData, u64, EnrolledPod> =
        open_pinned(pin_dir, names::MAP_ENROLLED)?;
    let flags = if inject_failure {
        0
    } else {
        ENROLLED_SELF_TEST
    };
    enrolled
        .insert(netns, EnrolledPod { flags, _pad: 0 }, 0)
        .map_err(map_err(names::MAP_ENROLLED))?;
    let result = exchange(pin_dir, netns, &listener, budget, started);
    // The namespace dies with this thread; its entry must not outlive it.
    let _ = enrolled.remove(&netns);
    result
}

fn exchange(
    pin_dir: &Path,
    netns: u64,
    listener: &TcpListener,
    budget: u32,
    started: Instant,
) -> Result<SelfTestReport, SelfTestError> {
    let budget = budget.max(MIN_BUDGET) as usize;
    let down_bytes = (budget / 2).min(DOWN_MAX);
    let up_bytes = (budget / 4).min(UP_MAX);
    let maps = MapReader::open(pin_dir)?;
    let before = maps.read();

    let mut client = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports::OUTBOUND))
        .map_err(io_err("connecting to 127.0.0.1:15001"))?;
    let (mut server, _) = listener.accept().map_err(io_err("accepting"))?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(io_err("setting socket timeouts"))?;
    }
    let keys = [sock_key(netns, &client)?, sock_key(netns, &server)?];
    if !wait_for(|| keys.iter().all(|k| maps.in_fast_path(k))) {
        return Err(SelfTestError::NotInserted(MAP_WAIT));
    }

    let down = pattern(down_bytes, 0x5eed);
    let mut up = pattern(up_bytes, 0xda7a);
    for n in 1..=SPLIT_WRITES {
        up.extend(std::iter::repeat_n(n as u8, n));
    }
    let up_ref = &up;
    let down_ref = &down;
    let server_side = std::thread::scope(|s| {
        let handle = s.spawn(move || -> Result<(), SelfTestError> {
            let mut ping = [0u8; SMALL.len()];
            server
                .read_exact(&mut ping)
                .map_err(io_err("server reading the first message"))?;
            compare("client to server, small write", SMALL, &ping)?;
            server
                .write_all(down_ref)
                .map_err(io_err("server writing in one large write"))?;
            let mut got = Vec::with_capacity(up_ref.len());
            server
                .read_to_end(&mut got)
                .map_err(io_err("server reading to the half-close"))?;
            compare("client to server, large and split writes", up_ref, &got)?;
            std::thread::sleep(LATE_REPLY);
            server
                .write_all(b"bye")
                .map_err(io_err("server answering the half-close"))?;
            Ok(())
        });
        let client_side = (|| -> Result<Option<Duration>, SelfTestError> {
            client
                .write_all(SMALL)
                .map_err(io_err("client writing the first message"))?;
            let mut got = vec![0u8; down_bytes];
            client
                .read_exact(&mut got)
                .map_err(io_err("client reading the large write"))?;
            compare("server to client, large write", down_ref, &got)?;
            client
                .write_all(&up_ref[..up_bytes])
                .map_err(io_err("client writing in one large write"))?;
            let mut at = up_bytes;
            for n in 1..=SPLIT_WRITES {
                client
                    .write_all(&up_ref[at..at + n])
                    .map_err(io_err("client writing small pieces"))?;
                at += n;
            }
            // A blocking read waiting across the half-close: the ACK of the FIN wakes the
            // reader without data, which must not end its read (as plain TCP never does).
            let mut reader = client
                .try_clone()
                .map_err(io_err("cloning the client socket"))?;
            let blocked = s.spawn(move || {
                let since = Instant::now();
                let mut bye = Vec::new();
                let mut flaw = None;
                loop {
                    match reader.read_to_end(&mut bye) {
                        // Early EAGAIN on a blocking socket: note it, and read on the way a
                        // non-blocking application would, so the other checks still run.
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                && since.elapsed() < IO_TIMEOUT =>
                        {
                            flaw.get_or_insert(since.elapsed());
                        }
                        r => return (r, bye, flaw),
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            client
                .shutdown(Shutdown::Write)
                .map_err(io_err("client half-closing"))?;
            let (r, bye, flaw) = blocked.join().map_err(|_| SelfTestError::Panicked)?;
            r.map_err(io_err("client reading after the half-close"))?;
            compare("server to client after the half-close", b"bye", &bye)?;
            Ok(flaw)
        })();
        let server_result = handle.join().unwrap_or(Err(SelfTestError::Panicked));
        server_result.and(client_side)
    });
    let blocking_read_flaw = server_side?;
    drop(client);

    let after = maps.read();
    let redirected = after.fast_path_redirected - before.fast_path_redirected;
    let stack = after.fast_path_stack - before.fast_path_stack;
    if stack > 0 || redirected == 0 {
        return Err(SelfTestError::NotRedirected { redirected, stack });
    }
    if !wait_for(|| keys.iter().all(|k| !maps.in_fast_path(k))) {
        return Err(SelfTestError::Leaked(MAP_WAIT));
    }
    // Last, so that `--fast-path=force` knows every other check passed.
    if let Some(after) = blocking_read_flaw {
        return Err(SelfTestError::BlockingReadEagain { after });
    }
    Ok(SelfTestReport {
        redirected,
        bytes: (SMALL.len() + down.len() + up.len() + 3) as u64,
        elapsed: started.elapsed(),
    })
}

fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + MAP_WAIT;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sock_key(netns: u64, s: &TcpStream) -> Result<SockKey, SelfTestError> {
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(SelfTestError::Io {
            step: "socket address",
            source: io::Error::other("IPv6 socket on a 127.0.0.1 connection"),
        }),
    };
    let local = v4(s.local_addr().map_err(io_err("local address"))?)?;
    let remote = v4(s.peer_addr().map_err(io_err("peer address"))?)?;
    Ok(SockKey {
        netns_cookie: netns,
        local_ip4: u32::from_ne_bytes(local.ip().octets()),
        remote_ip4: u32::from_ne_bytes(remote.ip().octets()),
        local_port: local.port(),
        remote_port: remote.port(),
        _pad: 0,
    })
}

fn compare(what: &'static str, expected: &[u8], got: &[u8]) -> Result<(), SelfTestError> {
    if expected == got {
        return Ok(());
    }
    let at = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    Err(SelfTestError::Corrupt {
        what,
        expected: expected.len(),
        got: got.len(),
        at,
    })
}

/// Deterministic bytes that make a reordering or a lost piece visible (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + SPLIT_WRITES * SPLIT_WRITES);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `ip link set lo up` in the calling thread's network namespace. Two ioctls rather than
/// rtnetlink (a dependency already): that would need an async runtime on this thread.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket syscall; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: zeroed ifreq is a valid value; the name is NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket and ifreq pointer for SIOCGIFFLAGS/SIOCSIFFLAGS.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_names_the_first_difference() {
        assert!(compare("same", b"abc", b"abc").is_ok());
        match compare("what", b"abcdef", b"abXdef") {
            Err(SelfTestError::Corrupt {
                at, expected, got, ..
            }) => {
                assert_eq!((at, expected, got), (2, 6, 6));
            }
            other => panic!("{other:?}"),
        }
        // A short read differs where it ends.
        match compare("what", b"abcdef", b"abc") {
            Err(SelfTestError::Corrupt { at, got, .. }) => assert_eq!((at, got), (3, 3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pattern_is_deterministic_and_varied() {
        let a = pattern(4099, 7);
        assert_eq!(a, pattern(4099, 7));
        assert_eq!(a.len(), 4099);
        assert_ne!(a, pattern(4099, 8));
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn without_its_map_the_fast_path_stays_off_and_says_why() {
        let fp = FastPath::unavailable("control map unavailable: test".into());
        match fp.set(true) {
            Err(FastPathError::Unusable(why)) => assert!(why.contains("control map"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(fp.set(false), Err(FastPathError::Map(_))));
        let s = fp.state();
        assert!(!s.on);
        assert_eq!(s.self_test, "not run");
    }

    #[test]
    fn sock_keys_of_the_two_ends_are_each_others_peer() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let (ck, sk) = (sock_key(9, &c).expect("key"), sock_key(9, &s).expect("key"));
        assert_eq!(ck.peer(), sk);
        assert_eq!(sk.local_port, l.local_addr().expect("addr").port());
        assert_eq!(ck.local_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
    }
}

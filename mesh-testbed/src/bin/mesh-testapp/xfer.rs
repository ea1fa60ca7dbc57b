//! `xfer`: sends bytes the ways applications do (write, sendfile, splice), half-closes and
//! checks every byte that comes back; `fill`: how much a connection to a reader that never
//! reads takes in before it pushes back.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::tcp::{Prng, connect};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// write(2) of --chunk bytes at a time.
    Write,
    /// sendfile(2) from a file holding the bytes.
    Sendfile,
    /// splice(2) from a pipe another thread fills.
    Splice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Reply {
    /// The server is `echo`: every byte must come back, in order.
    Echo,
    /// The server is `sink`: it answers `<bytes> <crc32>`.
    Sink,
    /// The server is `blob`: it sends `--blob-bytes` of its own and closes at once.
    Blob,
}

/// How the connection ends after the bytes are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum End {
    /// Half-close, read the whole reply, check it.
    HalfClose,
    /// close() at once, while the bytes may still be queued; nothing is read.
    Close,
    /// Reset (SO_LINGER 0) at once; nothing is read.
    Reset,
}

#[derive(clap::Args)]
pub struct XferArgs {
    /// HOST:PORT to connect to.
    #[arg(long)]
    connect: String,
    /// Bytes to send on each connection.
    #[arg(long)]
    bytes: usize,
    /// Bytes per write (mode write) or per sendfile/splice call.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    #[arg(long, value_enum, default_value = "write")]
    mode: Mode,
    #[arg(long, value_enum, default_value = "echo")]
    reply: Reply,
    /// Connections, one after the other, each checked.
    #[arg(long, default_value_t = 1)]
    connections: u64,
    /// Read/write timeout in seconds.
    #[arg(long, default_value_t = 20)]
    timeout: u64,
    /// Pause between writes (mode write), to keep a connection open across a change.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    #[arg(long, value_enum, default_value = "half-close")]
    end: End,
    /// With `--reply blob`: how many bytes the server sends.
    #[arg(long, default_value_t = 0)]
    blob_bytes: usize,
    /// Wait this long before reading the reply (a slow reader: the reply queues meanwhile).
    #[arg(long, default_value_t = 0)]
    read_delay_ms: u64,
}

/// Prints `ok connections N bytes B crc C` when every connection's reply matched (C: the
/// CRC-32 of the bytes each connection sent).
pub fn xfer(args: &XferArgs) -> Result<()> {
    ensure!(args.chunk > 0, "--chunk must be positive");
    let mut data = vec![0u8; args.bytes];
    Prng::new(0x5eed_f00d).fill(&mut data);
    for i in 0..args.connections {
        one(args, &data)
            .with_context(|| format!("connection {} of {}", i + 1, args.connections))?;
    }
    println!(
        "ok connections {} bytes {} crc {:08x}",
        args.connections,
        args.bytes,
        crc32fast::hash(&data)
    );
    Ok(())
}

fn one(args: &XferArgs, data: &[u8]) -> Result<()> {
    let sock = connect(&args.connect)?;
    let timeout = Some(Duration::from_secs(args.timeout.max(1)));
    sock.set_read_timeout(timeout)?;
    sock.set_write_timeout(timeout)?;
    if args.end != End::HalfClose {
        send(args, &sock, data)?;
        if args.end == End::Reset {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid fd, option pointer and length.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("SO_LINGER 0");
            }
        }
        drop(sock);
        return Ok(());
    }
    let reader = sock.try_clone().context("cloning the socket")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout.max(1));
    // Reads concurrently: an echo server sends back while we are still sending.
    let back = std::thread::scope(|s| -> Result<Vec<u8>> {
        let read_delay = Duration::from_millis(args.read_delay_ms);
        let handle = s.spawn(move || {
            std::thread::sleep(read_delay);
            read_to_end_polling(&reader, data.len(), deadline)
        });
        send(args, &sock, data)?;
        sock.shutdown(Shutdown::Write).context("half-closing")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
    })?;
    match args.reply {
        Reply::Echo => {
            if back != data {
                let at = back
                    .iter()
                    .zip(data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(back.len().min(data.len()));
                bail!(
                    "echo differs: {} bytes back of {} sent, first difference at byte {at}",
                    back.len(),
                    data.len()
                );
            }
        }
        Reply::Blob => {
            let mut expected = vec![0u8; args.blob_bytes];
            Prng::new(BLOB_SEED).fill(&mut expected);
            ensure!(
                back == expected,
                "blob differs: {} bytes of {} arrived{}",
                back.len(),
                expected.len(),
                back.iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .map(|at| format!(", first difference at byte {at}"))
                    .unwrap_or_default()
            );
        }
        Reply::Sink => {
            let expected = format!("{} {:08x}", data.len(), crc32fast::hash(data));
            let got = String::from_utf8_lossy(&back);
            ensure!(
                got.trim_end() == expected,
                "sink answered {:?}, expected {expected:?}",
                got.trim_end()
            );
        }
    }
    Ok(())
}

fn send(args: &XferArgs, sock: &TcpStream, data: &[u8]) -> Result<()> {
    match args.mode {
        Mode::Write => {
            let mut w = sock;
            for piece in data.chunks(args.chunk) {
                w.write_all(piece).context("write")?;
                if args.delay_ms > 0 {
                    std::thread::sleep(Duration::from_millis(args.delay_ms));
                }
            }
        }
        Mode::Sendfile => {
            let file = memfd_with(data)?;
            let mut offset: libc::off_t = 0;
            while (offset as usize) < data.len() {
                let n = (data.len() - offset as usize).min(args.chunk);
                // SAFETY: valid fds and offset pointer.
                let sent =
                    unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut offset, n) };
                if sent < 0 {
                    return Err(std::io::Error::last_os_error()).context("sendfile");
                }
                ensure!(sent > 0, "sendfile sent nothing at offset {offset}");
            }
        }
        Mode::Splice => {
            let (rd, wr) = pipe()?;
            std::thread::scope(|s| -> Result<()> {
                let filler = s.spawn(move || -> Result<()> {
                    let mut wr = std::fs::File::from(wr);
                    wr.write_all(data).context("filling the pipe")
                });
                let mut left = data.len();
                while left > 0 {
                    // SAFETY: valid fds; null offsets (pipe and socket have none).
                    let n = unsafe {
                        libc::splice(
                            rd.as_raw_fd(),
                            std::ptr::null_mut(),
                            sock.as_raw_fd(),
                            std::ptr::null_mut(),
                            left.min(args.chunk),
                            libc::SPLICE_F_MOVE,
                        )
                    };
                    if n < 0 {
                        return Err(std::io::Error::last_os_error()).context("splice");
                    }
                    ensure!(n > 0, "splice moved nothing with {left} bytes left");
                    left -= n as usize;
                }
                filler
                    .join()
                    .map_err(|_| anyhow::anyhow!("pipe filler panicked"))?
            })?;
        }
    }
    Ok(())
}

/// Reads to EOF the way event-loop applications do (poll, then a non-blocking recv; EAGAIN
/// means "wait again"), not with a blocking read.
fn read_to_end_polling(sock: &TcpStream, expect: usize, deadline: Instant) -> Result<Vec<u8>> {
    let mut back = Vec::with_capacity(expect);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "timed out reading the reply ({} bytes so far)",
            back.len()
        );
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e).context("reading the reply");
        }
        if n == 0 {
            return Ok(back);
        }
        back.extend_from_slice(&buf[..n as usize]);
    }
}

/// PRNG seed of what `blob` sends.
pub const BLOB_SEED: u64 = 0xb10b;

fn memfd_with(data: &[u8]) -> Result<std::fs::File> {
    // SAFETY: constant NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"xfer".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: a fresh fd nobody else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).context("writing the memfd")?;
    Ok(file)
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: valid out array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 returned two fresh fds we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[derive(clap::Args)]
pub struct FillArgs {
    /// HOST:PORT of a server that never reads (`stall`).
    #[arg(long)]
    connect: String,
    /// Stop after this many bytes even if they are still taken.
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: u64,
    /// The connection counts as full when it takes nothing for this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    quiet_ms: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// Prints `taken N` (bytes the connection took before pushing back) and `full yes|no`.
pub fn fill(args: &FillArgs) -> Result<()> {
    let mut sock = connect(&args.connect)?;
    sock.set_nonblocking(true)?;
    let buf = vec![0x5au8; 64 * 1024];
    let (mut taken, mut last_progress) = (0u64, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let quiet = Duration::from_millis(args.quiet_ms);
    let full = loop {
        if taken >= args.max_bytes || Instant::now() >= deadline {
            break false;
        }
        match sock.write(&buf) {
            Ok(n) => {
                taken += n as u64;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= quiet {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("write"),
        }
    };
    println!("taken {taken}");
    println!("full {}", if full { "yes" } else { "no" });
    Ok(())
}

//! gRPC with tonic: an echo server (unary, and bidirectional streaming where each message
//! comes back as it arrives) and a client that checks both. Messages are raw bytes (a
//! pass-through codec): a proxy test needs gRPC's framing, headers and trailers, not a schema.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Status, Streaming};

use crate::announce;

const UNARY: &str = "/nodemesh.test.Echo/Unary";
const CHAT: &str = "/nodemesh.test.Echo/Chat";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Messages are their bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The echo service, routed by method path as tonic's generated servers do.
#[derive(Clone)]
struct Echo {
    version: String,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "nodemesh.test.Echo";
}

struct Unary(String);

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let mut out = format!("{}:", self.0).into_bytes();
        out.extend_from_slice(req.get_ref());
        Box::pin(async move { Ok(tonic::Response::new(Bytes::from(out))) })
    }
}

struct Chat;

type EchoStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;

impl tonic::server::StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = EchoStream;
    type Future = BoxFuture<tonic::Response<EchoStream>, Status>;
    fn call(&mut self, req: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let stream: EchoStream = Box::pin(req.into_inner());
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
    }
}

impl<B> Service<http::Request<B>> for Echo
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let version = self.version.clone();
        match req.uri().path() {
            UNARY => Box::pin(async move {
                Ok(tonic::server::Grpc::new(Raw)
                    .unary(Unary(version), req)
                    .await)
            }),
            CHAT => {
                Box::pin(
                    async move { Ok(tonic::server::Grpc::new(Raw).streaming(Chat, req).await) },
                )
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, value_parser = crate::parse_listen)]
    listen: SocketAddr,
    /// Put in front of unary answers (`VERSION:message`).
    #[arg(long, default_value = "v1")]
    version: String,
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    announce(listener.local_addr().context("local address")?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(Echo {
            version: args.version,
        })
        .serve_with_incoming(incoming)
        .await
        .context("serving gRPC")
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// HOST:PORT of `mesh-testapp grpc-echo` (directly or through the mesh).
    #[arg(long)]
    connect: String,
    /// Unary calls to make.
    #[arg(long, default_value_t = 1)]
    unary: usize,
    /// Messages to exchange on one bidirectional stream, each sent only after the previous
    /// one's echo arrived (so both directions must stream).
    #[arg(long, default_value_t = 0)]
    chat: usize,
}

/// Prints `unary N ok (VERSIONS)` and `chat N ok`, or fails.
pub async fn client(args: ClientArgs) -> Result<()> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", args.connect))
        .context("the --connect address")?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.connect))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut versions = std::collections::BTreeSet::new();
    for i in 0..args.unary {
        grpc.ready().await.context("channel not ready")?;
        let msg = Bytes::from(format!("hello {i}"));
        let answer = grpc
            .unary(
                tonic::Request::new(msg.clone()),
                PathAndQuery::from_static(UNARY),
                Raw,
            )
            .await
            .with_context(|| format!("unary call {i}"))?
            .into_inner();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let Some((version, echoed)) = text.split_once(':') else {
            bail!("unary call {i}: unexpected answer {text:?}");
        };
        ensure!(
            echoed.as_bytes() == msg.as_ref(),
            "unary call {i}: echoed {echoed:?}"
        );
        versions.insert(version.to_string());
    }
    println!(
        "unary {} ok ({})",
        args.unary,
        versions.into_iter().collect::<Vec<_>>().join(",")
    );
    if args.chat == 0 {
        return Ok(());
    }
    grpc.ready().await.context("channel not ready")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static(CHAT),
            Raw,
        )
        .await
        .context("opening the chat stream")?
        .into_inner();
    for i in 0..args.chat {
        let msg = Bytes::from(format!("message {i} {}", "x".repeat(i * 10)));
        tx.send(msg.clone())
            .await
            .context("sending on the stream")?;
        let echo = tokio::time::timeout(TIMEOUT, inbound.message())
            .await
            .with_context(|| format!("no echo of message {i} within {TIMEOUT:?}"))?
            .with_context(|| format!("stream failed at message {i}"))?
            .with_context(|| format!("stream ended before the echo of message {i}"))?;
        ensure!(echo == msg, "message {i} came back as {echo:?}");
    }
    drop(tx);
    let end = tokio::time::timeout(TIMEOUT, inbound.next())
        .await
        .context("no end of stream")?;
    ensure!(end.is_none(), "unexpected message after the last: {end:?}");
    let trailers = inbound.trailers().await.context("reading the trailers")?;
    println!(
        "chat {} ok (trailers: {:?})",
        args.chat,
        trailers.map(|t| t.into_headers().len())
    );
    Ok(())
}

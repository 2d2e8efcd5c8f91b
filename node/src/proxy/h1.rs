//! HTTP/1.1 to an instance on this node, spoken by the task that proxies
//! the request.
//!
//! hyper's client runs every connection as a task of its own: a request
//! goes to it through a channel, its answer comes back through another
//! and each body chunk through a third, so each request wakes two tasks
//! several times. Here the request's own task writes the request and reads
//! the answer on the connection it took from the [`Pool`](super::pool),
//! and the answer's body gives the connection back when it ends.
//!
//! What it speaks (RFC 9112): a request framed by its `content-length`, by
//! its body's known size, or chunked; an answer framed by
//! `transfer-encoding: chunked`, `content-length` or the connection's end,
//! with none after `HEAD`, `204` and `304`; interim `1xx` answers skipped.
//! The request's body keeps going out while the answer comes in, as a
//! server may answer before it has read the whole request: while the head
//! is awaited, and then whenever the answer's body is read (so an instance
//! that streams its answer while it reads the request goes at the pace the
//! client reads the answer). A connection is
//! kept only after an exchange that ended cleanly on both sides and did
//! not ask for it to close. Upgrades (`101`) are not spoken here; the pool
//! sends those through hyper.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::pool::Lease;

/// The largest answer head (status line and headers), and trailer block.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The most headers an answer head may have.
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// A read asks for this much at first, and for up to [`READ_MAX`] while
/// reads fill what they asked for (a large body).
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Request body bytes queued for one write.
const WRITE_BATCH: usize = 64 * 1024;

/// An open connection to an instance, between exchanges or in one.
#[derive(Debug)]
pub(super) struct Conn {
    io: TcpStream,
    /// Bytes read and not yet taken: part of an answer.
    buf: BytesMut,
    read_size: usize,
}

impl Conn {
    pub(super) fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            read_size: READ_MIN,
        }
    }

    /// Whether the connection looks usable for a new request: the
    /// instance has not closed it or sent anything unasked. tokio answers
    /// from the socket's readiness without a system call unless the socket
    /// turned readable since the last read that drained it.
    pub(super) fn is_open(&self) -> bool {
        matches!(
            self.io.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Reads more of the answer into `buf`: the count, 0 at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let asked = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == asked && self.read_size < READ_MAX {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub(super) struct ExchangeError {
    pub(super) error: io::Error,
    /// No byte of an answer came, and the connection was found closed:
    /// on a reused connection, the instance closed it while it was idle,
    /// most likely before reading the request.
    pub(super) closed_unanswered: bool,
}

impl ExchangeError {
    fn new(error: io::Error, closed_unanswered: bool) -> Self {
        Self {
            error,
            closed_unanswered,
        }
    }
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// How a request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outgoing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    Chunked,
}

/// The request head in HTTP/1.1 form (`path` in origin form, the headers
/// as given plus the framing header the body needs), and its framing.
pub(super) fn encode_head(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &ProxyBody,
) -> io::Result<(Bytes, Outgoing)> {
    let declared = content_lengths(headers)
        .map_err(|()| invalid("the request has a malformed content-length"))?;
    let (outgoing, add) = match declared {
        Some(n) => (Outgoing::Length(n), Some(n)),
        None if body.is_end_stream() => {
            // A method whose request normally carries content says it has
            // none (RFC 9110 §8.6); the others say nothing.
            let say = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
            (Outgoing::Length(0), say.then_some(0))
        }
        None => match body.size_hint().exact() {
            Some(n) => (Outgoing::Length(n), Some(n)),
            None => (Outgoing::Chunked, None),
        },
    };
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.as_str().len()
        + path.len()
        + 64;
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH {
            // Written once below, as one number.
            continue;
        }
        put_field(&mut out, name, value);
    }
    if let Some(n) = add {
        out.put_slice(b"content-length: ");
        out.put_slice(n.to_string().as_bytes());
        out.put_slice(b"\r\n");
    }
    if outgoing == Outgoing::Chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    out.put_slice(b"\r\n");
    Ok((out.freeze(), outgoing))
}

/// One `name: value` line of a head or a trailer block.
fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

/// The length every `content-length` line of `headers` gives (None if
/// there is none); an error if one is malformed or they differ.
fn content_lengths(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let n = content_length(value).ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

/// A `content-length` value: a number, or a list of the same number.
fn content_length(value: &HeaderValue) -> Option<u64> {
    let mut found = None;
    for part in value.to_str().ok()?.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = part.parse().ok()?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The request's side of an exchange: what is still to be written.
#[derive(Debug)]
struct Sending {
    /// The body still to be read; `None` once it ended.
    body: Option<ProxyBody>,
    outgoing: Outgoing,
    /// Bytes a `content-length` body may still send.
    left: u64,
    out: VecDeque<Bytes>,
    queued: usize,
    /// The body itself failed, or did not match its declared length: the
    /// sender's fault, not the instance's, and the instance still waits
    /// for the rest.
    failed: bool,
}

impl Sending {
    fn new(head: Bytes, body: ProxyBody, outgoing: Outgoing) -> Self {
        let (body, left) = match outgoing {
            Outgoing::Length(0) => (None, 0),
            Outgoing::Length(n) => (Some(body), n),
            Outgoing::Chunked => (Some(body), 0),
        };
        let queued = head.len();
        Self {
            body,
            outgoing,
            left,
            out: VecDeque::from([head]),
            queued,
            failed: false,
        }
    }

    fn done(&self) -> bool {
        self.body.is_none() && self.out.is_empty()
    }

    fn queue(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.out.push_back(bytes);
    }

    /// Takes a frame the body has ready into the queue. Ready(false) once
    /// the body ended.
    fn take_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let chunked = self.outgoing == Outgoing::Chunked;
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        return Poll::Ready(Ok(true));
                    }
                    let n = data.len() as u64;
                    if chunked {
                        self.queue(Bytes::from(format!("{n:x}\r\n")));
                        self.queue(data);
                        self.queue(Bytes::from_static(b"\r\n"));
                    } else if n > self.left {
                        self.failed = true;
                        return Poll::Ready(Err(invalid(
                            "the request's body is longer than its content-length",
                        )));
                    } else {
                        self.left -= n;
                        self.queue(data);
                        if self.left == 0 {
                            // All it declared: its end need not be awaited.
                            self.body = None;
                        }
                    }
                    Poll::Ready(Ok(true))
                }
                Err(frame) => {
                    // Trailers end the body; chunked framing carries them.
                    if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                        let mut block = BytesMut::from(&b"0\r\n"[..]);
                        for (name, value) in &trailers {
                            put_field(&mut block, name, value);
                        }
                        block.put_slice(b"\r\n");
                        self.queue(block.freeze());
                        self.body = None;
                        return Poll::Ready(Ok(false));
                    }
                    Poll::Ready(Ok(true))
                }
            },
            Some(Err(e)) => {
                self.failed = true;
                Poll::Ready(Err(io::Error::other(e)))
            }
            None => {
                self.body = None;
                if chunked {
                    self.queue(Bytes::from_static(b"0\r\n\r\n"));
                } else if self.left > 0 {
                    self.failed = true;
                    return Poll::Ready(Err(invalid(
                        "the request's body ended before its content-length",
                    )));
                }
                Poll::Ready(Ok(false))
            }
        }
    }

    /// Writes what there is to write; Ready once the whole request went
    /// out. Frames the body has ready go out with the head, in one write.
    fn poll_send(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.body.is_some() && self.queued < WRITE_BATCH {
                match self.take_frame(cx) {
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if self.out.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); 16];
            let mut count = 0;
            for (slot, bytes) in slices.iter_mut().zip(&self.out) {
                *slot = IoSlice::new(bytes);
                count += 1;
            }
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= n;
            while n > 0 {
                let front = &mut self.out[0];
                if n >= front.len() {
                    n -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
    }
}

/// How an answer's body is framed, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// This many bytes left (0: the body has ended).
    Length(u64),
    Chunked(Chunk),
    /// Until the instance closes the connection.
    Close,
    /// It has ended.
    Done,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, then an empty line.
    Trailers,
}

/// One request and its answer on a connection.
#[derive(Debug)]
pub(super) struct Exchange {
    /// Taken when the connection goes back to the pool or is closed.
    conn: Option<Conn>,
    sending: Sending,
    incoming: Incoming,
    /// The connection may carry another exchange after this one.
    reusable: bool,
    /// Where the connection goes when the exchange ends cleanly.
    back: Option<Lease>,
    /// Why the request stopped going out before the answer's head came.
    send_error: Option<io::Error>,
}

/// Sends the request (its `head` from [`encode_head`], then `body`) on
/// `conn` and reads the answer's head. The body keeps going out while
/// the caller reads the answer's. The connection goes back to the pool
/// through `back` when the exchange ended cleanly and may be followed by
/// another.
pub(super) async fn exchange(
    conn: Conn,
    head: Bytes,
    body: ProxyBody,
    outgoing: Outgoing,
    method: &Method,
    back: Lease,
) -> Result<http::Response<Exchange>, ExchangeError> {
    let mut x = Exchange {
        conn: Some(conn),
        sending: Sending::new(head, body, outgoing),
        incoming: Incoming::Done,
        reusable: true,
        back: Some(back),
        send_error: None,
    };
    let mut answered = false;
    let parts = std::future::poll_fn(|cx| x.poll_head(cx, method, &mut answered))
        .await
        .map_err(|e| {
            let closed = matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            );
            if closed && !answered {
                let e = io::Error::new(
                    e.kind(),
                    format!("the connection closed before an answer came ({e})"),
                );
                return ExchangeError::new(e, true);
            }
            ExchangeError::new(e, false)
        })?;
    Ok(http::Response::from_parts(parts, x))
}

impl Exchange {
    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("the connection is held until the end")
    }

    /// Keeps the request going out; a failure after the answer began
    /// only costs the connection.
    fn poll_sending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sending.done() {
            return Poll::Ready(Ok(()));
        }
        let Self { conn, sending, .. } = self;
        let io = &mut conn.as_mut().expect("held until the end").io;
        sending.poll_send(io, cx)
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        answered: &mut bool,
    ) -> Poll<io::Result<http::response::Parts>> {
        if let Poll::Ready(Err(e)) = self.poll_sending(cx) {
            if self.sending.failed {
                // Nothing to wait for: the instance waits for the rest.
                return Poll::Ready(Err(e));
            }
            // The instance may have answered without reading the rest (and
            // closed): the answer is still worth reading.
            self.abandon_request();
            self.send_error = Some(e);
        }
        loop {
            if !self.conn().buf.is_empty() {
                *answered = true;
                if let Some(parts) = self.parse_head(method)? {
                    return Poll::Ready(Ok(parts));
                }
            }
            let n = match ready!(self.conn().poll_fill(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.send_error.take().unwrap_or(e))),
            };
            if n == 0 {
                if let (Some(e), false) = (self.send_error.take(), *answered) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Err(if *answered {
                    invalid("the instance closed the connection in the middle of its answer's head")
                } else {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream")
                }));
            }
        }
    }

    fn abandon_request(&mut self) {
        self.sending.body = None;
        self.sending.out.clear();
        self.reusable = false;
    }

    /// The answer's head if the connection's buffer holds all of it, with
    /// the body's framing set.
    fn parse_head(&mut self, method: &Method) -> io::Result<Option<http::response::Parts>> {
        let conn = self.conn.as_mut().expect("held until the end");
        let Some(head) = parse_head(&mut conn.buf, method)? else {
            return Ok(None);
        };
        self.reusable &= head.keep;
        self.incoming = head.incoming;
        if self.incoming == Incoming::Length(0) {
            self.finish();
        }
        Ok(Some(head.parts))
    }

    /// The body has ended: the connection goes back if both sides ended
    /// cleanly, or is closed.
    fn finish(&mut self) {
        self.incoming = Incoming::Done;
        if !self.reusable || !self.sending.done() {
            self.conn = None;
            return;
        }
        if let Some(mut conn) = self.conn.take()
            && conn.buf.is_empty()
            && let Some(back) = self.back.take()
        {
            if conn.read_size > READ_MIN {
                // A large body's buffer is not kept while idle.
                conn.read_size = READ_MIN;
                conn.buf = BytesMut::new();
            }
            back.give_back(conn);
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        if self.conn.is_some() && !self.sending.done() {
            match self.poll_sending(cx) {
                Poll::Ready(Err(_)) => self.abandon_request(),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        loop {
            match self.incoming {
                Incoming::Done => return Poll::Ready(None),
                Incoming::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Incoming::Length(left) => {
                    let conn = self.conn();
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(cut_short())));
                    }
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    self.incoming = Incoming::Length(left - take as u64);
                    if left == take as u64 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Incoming::Close => {
                    let conn = self.conn();
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Incoming::Chunked(chunk) => {
                    if let Some(frame) = ready!(self.poll_chunked(chunk, cx))? {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
            }
        }
    }

    /// One step of a chunked body: a frame, or None when the reader only
    /// moved on (the caller loops).
    fn poll_chunked(
        &mut self,
        chunk: Chunk,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Frame<Bytes>>>> {
        let conn = self.conn();
        match chunk_step(chunk, &mut conn.buf)? {
            Step::More => fill(conn, cx),
            Step::Next(next) => {
                self.incoming = Incoming::Chunked(next);
                Poll::Ready(Ok(None))
            }
            Step::Data(data, next) => {
                self.incoming = Incoming::Chunked(next);
                Poll::Ready(Ok(Some(Frame::data(data))))
            }
            Step::End(trailers) => {
                self.finish();
                Poll::Ready(Ok(trailers.map(Frame::trailers)))
            }
        }
    }
}

/// An answer's head: its parts, how its body is framed, and whether the
/// connection may be kept after it.
#[derive(Debug)]
struct Head {
    parts: http::response::Parts,
    incoming: Incoming,
    keep: bool,
}

/// The answer to a `method` request whose head `buf` starts with, taken
/// out of it (interim `1xx` answers before it too); None while `buf`
/// holds only part of it. At most [`MAX_HEAD`] bytes and
/// [`MAX_HEADERS`] headers.
fn parse_head(buf: &mut BytesMut, method: &Method) -> io::Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
            Ok(_) => {
                return Err(invalid(format!(
                    "the instance's answer head is larger than {MAX_HEAD} bytes"
                )));
            }
            Err(e) => return Err(invalid(format!("the instance's answer head: {e}"))),
        };
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| invalid(format!("the instance answered status {code}")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(invalid("the instance switched protocols unasked"));
            }
            buf.advance(len);
            continue;
        }
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Names now, values as slices of the head once it is split off.
        let mut names = smallvec::SmallVec::<[(HeaderName, usize, usize); 16]>::new();
        let base = buf.as_ptr() as usize;
        for h in response.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                invalid(format!("the instance sent a bad header name {:?}", h.name))
            })?;
            let start = h.value.as_ptr() as usize - base;
            names.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(names.len());
        for (name, start, end) in names {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| invalid(format!("the instance sent a bad value for {name}")))?;
            map.append(name, value);
        }
        let (incoming, framed_to_keep) = framing(method, status, version, &map)?;
        let keep = framed_to_keep && keeps_alive(version, &map);
        if matches!(incoming, Incoming::Chunked(_)) {
            // The chunks frame the body: a content-length beside them is
            // wrong, and is not passed on (RFC 9112 §6.3).
            map.remove(http::header::CONTENT_LENGTH);
        }
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = version;
        parts.headers = map;
        return Ok(Some(Head {
            parts,
            incoming,
            keep,
        }));
    }
}

/// How an answer's body is framed (RFC 9112 §6.3), and whether that
/// framing lets the connection be kept.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
) -> io::Result<(Incoming, bool)> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Incoming::Length(0), true));
    }
    if let Some(te) = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        if last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            // With a content-length too, chunked wins and the connection
            // is not kept; nor after HTTP/1.0, which has no chunks.
            let keep =
                version == Version::HTTP_11 && !headers.contains_key(http::header::CONTENT_LENGTH);
            return Ok((Incoming::Chunked(Chunk::Size), keep));
        }
        return Ok((Incoming::Close, false));
    }
    match content_lengths(headers) {
        Ok(Some(n)) => Ok((Incoming::Length(n), true)),
        Ok(None) => Ok((Incoming::Close, false)),
        Err(()) => Err(invalid("the instance sent a malformed content-length")),
    }
}

/// What one step of a chunked body's decoder found.
#[derive(Debug)]
enum Step {
    /// The buffer holds too little to go on: read more.
    More,
    /// It moved on, to this.
    Next(Chunk),
    /// Body bytes, and where it is after them.
    Data(Bytes, Chunk),
    /// The body ended, with these trailers if any.
    End(Option<HeaderMap>),
}

/// One step of decoding a chunked body at `chunk` from `buf`, taking what
/// it read out of `buf`. A chunk-size line is at most [`MAX_CHUNK_LINE`]
/// bytes and the trailers at most [`MAX_HEAD`].
fn chunk_step(chunk: Chunk, buf: &mut BytesMut) -> io::Result<Step> {
    match chunk {
        Chunk::Size => {
            let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(invalid("a chunk-size line is too long"));
                }
                return Ok(Step::More);
            };
            if end > MAX_CHUNK_LINE {
                return Err(invalid("a chunk-size line is too long"));
            }
            let size = chunk_size(&buf[..end])?;
            buf.advance(end + 1);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let take = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(take).freeze();
            let left = left - take as u64;
            let next = if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            };
            Ok(Step::Data(data, next))
        }
        Chunk::DataEnd => {
            // A line end, as after the size: CRLF, or a bare LF.
            let end = match &buf[..] {
                [b'\n', ..] => 1,
                [b'\r', b'\n', ..] => 2,
                [] | [b'\r'] => return Ok(Step::More),
                _ => return Err(invalid("a chunk's data is longer than its size")),
            };
            buf.advance(end);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut headers) {
                Ok(httparse::Status::Complete((len, found))) if len <= MAX_HEAD => {
                    let mut trailers = HeaderMap::with_capacity(found.len());
                    for h in found {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => Ok(Step::More),
                Ok(_) => Err(invalid("the answer's trailers are too large")),
                Err(e) => Err(invalid(format!("the answer's trailers: {e}"))),
            }
        }
    }
}

/// Reads more; the caller steps again (`Ok(None)`) unless the connection
/// ended.
fn fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<Option<Frame<Bytes>>>> {
    if ready!(conn.poll_fill(cx))? == 0 {
        return Poll::Ready(Err(cut_short()));
    }
    Poll::Ready(Ok(None))
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the instance closed the connection before its answer's end",
    )
}

/// A chunk-size line's size: hex digits, then optional whitespace and
/// extensions (`;name=value`, ignored), then the line end.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let bad = || invalid("a malformed chunk size");
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    let rest = rest.trim_ascii_start();
    if digits.is_empty() || !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(bad());
    }
    // Leading zeros add nothing; more than 15 digits would not fit.
    let first = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len() - 1);
    let significant = &digits[first..];
    if significant.len() > 15 {
        return Err(bad());
    }
    let mut n = 0u64;
    for &b in significant {
        let d = (b as char).to_digit(16).ok_or_else(bad)?;
        n = n * 16 + u64::from(d);
    }
    Ok(n)
}

/// Whether the connection may carry another exchange after this answer.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let said =
        |token: &str| super::hop::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token));
    if version == Version::HTTP_10 {
        said("keep-alive")
    } else {
        !said("close")
    }
}

impl Body for Exchange {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let polled = self.poll_body(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            // Where the answer stands is unknown: the connection goes.
            self.conn = None;
            self.incoming = Incoming::Done;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming == Incoming::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.incoming {
            Incoming::Length(n) => SizeHint::with_exact(n),
            Incoming::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http::Request;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::proxy::body;
    use crate::proxy::pool::{Answer, Pool, PoolError};
    use crate::tasks::Tasks;

    /// An instance on a port of its own: `conn` serves each connection it
    /// accepts (with the connection's number); counts them.
    async fn instance<F, Fut>(conn: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(conn(stream, n));
            }
        });
        (port, accepted)
    }

    /// Reads one request head (and nothing after it) off `stream`: None
    /// at the connection's end.
    async fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    /// An instance answering every request head with `answer`, then
    /// closing the connection if `close`.
    async fn answering(answer: &'static [u8], close: bool) -> (u16, Arc<AtomicUsize>) {
        instance(move |mut stream, _| async move {
            while read_head(&mut stream).await.is_some() {
                if stream.write_all(answer).await.is_err() || close {
                    return;
                }
            }
        })
        .await
    }

    fn pool() -> (Tasks, Arc<Pool>) {
        let tasks = Tasks::new();
        let pool = Pool::new(Duration::from_secs(30), 8, &tasks);
        (tasks, pool)
    }

    fn request(method: Method, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = http::Uri::from_static("/x?y=1");
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("svc"));
        req
    }

    async fn send(
        pool: &Arc<Pool>,
        port: u16,
        req: Request<ProxyBody>,
    ) -> Result<http::Response<Answer>, PoolError> {
        pool.send("127.0.0.1", port, req, false, Duration::from_secs(5))
            .await
    }

    /// The answer's status, body and trailers.
    async fn call(
        pool: &Arc<Pool>,
        port: u16,
        req: Request<ProxyBody>,
    ) -> (StatusCode, Bytes, Option<HeaderMap>) {
        let response = send(pool, port, req).await.unwrap();
        let status = response.status();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (status, collected.to_bytes(), trailers)
    }

    fn get() -> Request<ProxyBody> {
        request(Method::GET, body::empty())
    }

    #[tokio::test]
    async fn a_chunked_answer_and_its_trailers_are_read_and_the_connection_kept() {
        let (_tasks, pool) = pool();
        let (port, accepted) = answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
            false,
        )
        .await;
        for _ in 0..3 {
            let (status, body, trailers) = call(&pool, port, get()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "hello world");
            assert_eq!(trailers.unwrap()["x-sum"], "42");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn an_answer_ended_by_closing_is_read_whole_and_its_connection_not_kept() {
        let (_tasks, pool) = pool();
        let (port, accepted) =
            answering(b"HTTP/1.1 200 OK\r\nx-a: b\r\n\r\nuntil the end", true).await;
        for _ in 0..2 {
            let (_, body, _) = call(&pool, port, get()).await;
            assert_eq!(body, "until the end");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_204_and_head_answers_have_no_body() {
        let (_tasks, pool) = pool();
        let (port, accepted) = instance(|mut stream, _| async move {
            let mut n = 0;
            while let Some(head) = read_head(&mut stream).await {
                n += 1;
                let answer: &[u8] = if head.starts_with("HEAD ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
                } else if n == 1 {
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                      HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                };
                stream.write_all(answer).await.unwrap();
            }
        })
        .await;
        let response = send(&pool, port, get()).await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(response.headers()["x-n"], "1");
        assert!(
            response.body().is_end_stream(),
            "nothing to read after a 204"
        );
        drop(response);
        let (status, body, _) = call(&pool, port, request(Method::HEAD, body::empty())).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        let (_, body, _) = call(&pool, port, get()).await;
        assert_eq!(body, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for all three"
        );
    }

    /// An instance that records each whole request it reads (head and
    /// body, the body framed by its content-length, or chunked to its last
    /// chunk and trailers) and answers it 200.
    async fn recording() -> (u16, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let (port, _) = instance(move |mut stream, _| {
            let log = log.clone();
            async move {
                let mut raw = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let head = &text[..end + 4];
                        let whole = if head.contains("transfer-encoding: chunked") {
                            text[end..].find("\r\n0\r\n").and_then(|last| {
                                let from = end + last + 5;
                                text[from..]
                                    .find("\r\n\r\n")
                                    .map(|e| from + e + 4)
                                    .or(text[from..].starts_with("\r\n").then_some(from + 2))
                            })
                        } else {
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |n| n.parse::<usize>().unwrap());
                            (raw.len() >= end + 4 + len).then_some(end + 4 + len)
                        };
                        if let Some(whole) = whole {
                            log.lock().unwrap().push(text[..whole].to_owned());
                            raw.drain(..whole);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            stream.write_all(ok).await.unwrap();
                            continue;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => raw.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        })
        .await;
        (port, seen)
    }

    #[tokio::test]
    async fn a_body_goes_with_its_length_when_known_and_chunked_when_not() {
        let (_tasks, pool) = pool();
        let (port, seen) = recording().await;
        call(&pool, port, request(Method::POST, body::full("hello"))).await;
        call(&pool, port, request(Method::POST, body::empty())).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b", world"))))
            .await
            .unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        call(&pool, port, request(Method::PUT, body::from_channel(rx))).await;
        let seen = seen.lock().unwrap();
        assert!(
            seen[0].starts_with("POST /x?y=1 HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("\r\nhost: svc\r\n"), "{}", seen[0]);
        assert!(
            seen[0].ends_with("content-length: 5\r\n\r\nhello"),
            "{}",
            seen[0]
        );
        assert!(
            seen[1].ends_with("content-length: 0\r\n\r\n"),
            "{}",
            seen[1]
        );
        assert!(
            seen[2].ends_with(
                "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 7\r\n\r\n"
            ),
            "{}",
            seen[2]
        );
        assert!(!seen[2].contains("content-length"), "{}", seen[2]);
    }

    #[tokio::test]
    async fn an_instance_answering_before_reading_the_body_is_heard() {
        let (_tasks, pool) = pool();
        let (port, _) = instance(|mut stream, _| async move {
            read_head(&mut stream).await;
            let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig";
            stream.write_all(answer).await.unwrap();
        })
        .await;
        // A body that never ends.
        let (tx, rx) = mpsc::channel(1);
        tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 1 << 20]))))
            .await
            .unwrap();
        let (status, body, _) =
            call(&pool, port, request(Method::POST, body::from_channel(rx))).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::PAYLOAD_TOO_LARGE, &b"big"[..])
        );
        assert_eq!(
            pool.idle(),
            0,
            "the request did not end: the connection goes"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_request_body_that_fails_ends_the_exchange_at_once() {
        let (_tasks, pool) = pool();
        // It waits for the whole body, and never answers.
        let (port, _) = instance(|mut stream, _| async move {
            read_head(&mut stream).await;
            let _ = stream.read(&mut [0u8; 64]).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let (tx, rx) = mpsc::channel(2);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        tx.send(Err("the client's chunk size is malformed".into()))
            .await
            .unwrap();
        let sent = send(&pool, port, request(Method::POST, body::from_channel(rx)));
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Err(PoolError::Request(e))) => assert!(e.contains("malformed"), "{e}"),
            Ok(other) => panic!("{other:?}"),
            Err(_) => panic!("still waiting for an answer after 10 s"),
        }
    }

    #[tokio::test]
    async fn a_body_shorter_than_its_content_length_fails_at_once() {
        let (_tasks, pool) = pool();
        let (port, _) = instance(|mut stream, _| async move {
            read_head(&mut stream).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let mut req = request(Method::PUT, body::full("hello"));
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        match tokio::time::timeout(Duration::from_secs(10), send(&pool, port, req)).await {
            Ok(Err(PoolError::Request(e))) => assert!(e.contains("ended before"), "{e}"),
            Ok(other) => panic!("{other:?}"),
            Err(_) => panic!("still waiting for an answer after 10 s"),
        }
    }

    #[tokio::test]
    async fn content_length_lines_go_out_as_one_and_conflicting_ones_are_refused() {
        let (_tasks, pool) = pool();
        let (port, seen) = recording().await;
        let mut req = request(Method::POST, body::full("hello"));
        req.headers_mut()
            .append(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        req.headers_mut().append(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_static("5, 5"),
        );
        call(&pool, port, req).await;
        let first = seen.lock().unwrap()[0].clone();
        assert_eq!(first.matches("content-length").count(), 1, "{first}");
        assert!(first.ends_with("content-length: 5\r\n\r\nhello"), "{first}");
        let mut req = request(Method::POST, body::full("hello"));
        req.headers_mut()
            .append(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        req.headers_mut()
            .append(http::header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        match send(&pool, port, req).await {
            Err(PoolError::Request(e)) => assert!(e.contains("malformed content-length"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "nothing sent");
    }

    #[test]
    fn chunks_beat_a_content_length_which_is_dropped_and_http_1_0_chunks_are_not_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.incoming, Incoming::Chunked(Chunk::Size));
        assert!(!head.keep);
        assert!(
            !head
                .parts
                .headers
                .contains_key(http::header::CONTENT_LENGTH)
        );
        let mut buf = BytesMut::from(
            &b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert!(!head.keep);
    }

    #[tokio::test]
    async fn a_get_is_sent_again_at_most_once() {
        let (_tasks, pool) = pool();
        let heads = Arc::new(AtomicUsize::new(0));
        let read = heads.clone();
        // The first connection answers one request; every other request,
        // on any connection, is read and left unanswered.
        let (port, accepted) = instance(move |mut stream, n| {
            let read = read.clone();
            async move {
                let mut answered = n > 0;
                while read_head(&mut stream).await.is_some() {
                    read.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        return;
                    }
                    answered = true;
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    stream.write_all(answer).await.unwrap();
                }
            }
        })
        .await;
        call(&pool, port, get()).await;
        match send(&pool, port, get()).await {
            Err(PoolError::Request(e)) => assert!(e.contains("closed before an answer"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            heads.load(Ordering::SeqCst),
            3,
            "sent once, then once again"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn close_and_http_1_0_answers_do_not_keep_their_connection() {
        let (_tasks, pool) = pool();
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let (port, accepted) = instance(move |mut stream, _| async move {
                while read_head(&mut stream).await.is_some() {
                    stream.write_all(answer).await.unwrap();
                }
            })
            .await;
            for _ in 0..2 {
                assert_eq!(call(&pool, port, get()).await.1, "ok");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        }
        let (port, accepted) = answering(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            false,
        )
        .await;
        for _ in 0..2 {
            call(&pool, port, get()).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "HTTP/1.0 asking to keep it"
        );
    }

    #[tokio::test]
    async fn bad_answers_are_clear_errors() {
        let (_tasks, pool) = pool();
        let huge: &'static [u8] = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(MAX_HEAD))
                .into_bytes()
                .into_boxed_slice(),
        );
        for (answer, says) in [
            (
                &b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"[..],
                "answer head",
            ),
            (b"SMTP ready\r\n\r\n", "answer head"),
            (huge, "larger than 65536 bytes"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
                "malformed content-length",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "switched protocols",
            ),
        ] {
            let (port, _) = answering(answer, true).await;
            match send(&pool, port, get()).await {
                Err(PoolError::Request(e)) => assert!(e.contains(says), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        for (answer, says) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"[..],
                "before its answer's end",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n",
                "longer than its size",
            ),
        ] {
            let (port, _) = answering(answer, true).await;
            let response = send(&pool, port, get()).await.unwrap();
            let e = response.into_body().collect().await.unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        assert_eq!(pool.idle(), 0);
    }

    /// An instance that answers the first request on each connection and
    /// closes it on reading the second: as if it closed the connection
    /// while idle and the close crossed the request.
    async fn closing_after_one() -> (u16, Arc<AtomicUsize>) {
        instance(|mut stream, _| async move {
            if read_head(&mut stream).await.is_some() {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                stream.write_all(answer).await.unwrap();
            }
            read_head(&mut stream).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_get_the_instance_closed_unanswered_is_sent_again_on_a_new_connection() {
        let (_tasks, pool) = pool();
        let (port, accepted) = closing_after_one().await;
        for _ in 0..3 {
            assert_eq!(call(&pool, port, get()).await.1, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_post_the_instance_closed_unanswered_is_an_error_not_sent_twice() {
        let (_tasks, pool) = pool();
        let (port, accepted) = closing_after_one().await;
        call(&pool, port, get()).await;
        match send(&pool, port, request(Method::POST, body::full("once"))).await {
            Err(PoolError::Request(e)) => {
                assert!(e.contains("closed before an answer came"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// Feeds `input` to a chunked body's decoder `piece` bytes at a time,
    /// as reads would: the body's bytes and its trailers, or the error.
    fn decode_chunked(input: &[u8], piece: usize) -> io::Result<(Vec<u8>, Option<HeaderMap>)> {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut chunk = Chunk::Size;
        let mut body = Vec::new();
        // Every step consumes input or asks for more: bounded.
        for _ in 0..4 * input.len() + 16 {
            match chunk_step(chunk, &mut buf)? {
                Step::More if fed == input.len() => {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Step::More => {
                    let end = (fed + piece).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
                Step::Next(next) => chunk = next,
                Step::Data(data, next) => {
                    body.extend_from_slice(&data);
                    chunk = next;
                }
                Step::End(trailers) => {
                    assert!(
                        buf.is_empty() && fed == input.len(),
                        "all read, nothing left"
                    );
                    return Ok((body, trailers));
                }
            }
        }
        panic!("the decoder stopped making progress");
    }

    proptest::proptest! {
        #[test]
        fn chunked_bodies_decode_to_what_was_encoded(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(1usize..700, 0..12),
            ext in proptest::prelude::any::<bool>(),
            trailer in proptest::prelude::any::<bool>(),
            piece in 1usize..300,
        ) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            for cut in cuts.iter().copied().chain(std::iter::once(usize::MAX)) {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at(cut.min(rest.len()));
                wire.extend_from_slice(format!("{:X}", now.len()).as_bytes());
                if ext {
                    wire.extend_from_slice(b";name=\"v\"");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(now);
                wire.extend_from_slice(b"\r\n");
                rest = later;
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-sum: 9\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            let (decoded, trailers) = decode_chunked(&wire, piece).unwrap();
            proptest::prop_assert_eq!(decoded, body);
            proptest::prop_assert_eq!(trailers.map(|t| t["x-sum"].clone()), trailer.then(|| HeaderValue::from_static("9")));
        }

        #[test]
        fn the_answer_decoders_survive_garbage_and_stay_bounded(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            piece in 1usize..512,
        ) {
            let _ = decode_chunked(&bytes, piece);
            let mut buf = BytesMut::new();
            for part in bytes.chunks(piece) {
                buf.extend_from_slice(part);
                match parse_head(&mut buf, &Method::GET) {
                    Ok(None) => proptest::prop_assert!(buf.len() <= MAX_HEAD),
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn a_head_split_anywhere_parses_the_same() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\nx-a: c\r\n\r\nabc";
        for split in 0..answer.len() {
            let mut buf = BytesMut::from(&answer[..split]);
            let first = parse_head(&mut buf, &Method::GET).unwrap();
            buf.extend_from_slice(&answer[split..]);
            let head = match first {
                Some(head) => head,
                None => parse_head(&mut buf, &Method::GET).unwrap().unwrap(),
            };
            assert_eq!(head.parts.status, StatusCode::OK);
            let values: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
            assert_eq!(values, ["b", "c"]);
            assert_eq!((head.incoming, head.keep), (Incoming::Length(3), true));
            assert_eq!(&buf[..], b"abc", "the body stays in the buffer");
        }
    }

    #[test]
    fn chunk_sizes_are_hex_with_extensions_ignored() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"0;name=value").unwrap(), 0);
        assert_eq!(chunk_size(b"FF ; x").unwrap(), 255);
        assert_eq!(chunk_size(b"00000000000000000001\r").unwrap(), 1);
        assert_eq!(chunk_size(b"0000").unwrap(), 0);
        for bad in [
            &b""[..],
            b"\r",
            b"g",
            b"-1",
            b"1111111111111111",
            b"5 junk",
            b"5x",
        ] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}

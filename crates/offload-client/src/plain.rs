//! HTTP/1.1 over plain TCP for the client's requests to an `http://`
//! server, each on a connection kept open between requests.
//!
//! Why not reqwest, which serves `https://` servers and event streams: one
//! enqueue a request through reqwest got 1,685–1,697 answers a second from
//! a server that a bare socket got 2,246–2,691 from, and a pickup through
//! this client and its worker took ~190 µs more than through bare sockets
//! (`bench/client-stacks/run`, `bench/raw-pickup.py`, `bench/HISTORY.md`
//! round 75). The work reqwest and hyper do between an answer and the next
//! request (a pool, a connection task and channels to it) is small, but
//! the server's threads fall asleep meanwhile, and waking a halted CPU
//! costs more than the work.
//!
//! What it speaks: a request with a `content-length`, never pipelined;
//! answers with a `content-length`, chunked, or read to the connection's
//! end. A connection is kept only after an answer read whole that did not
//! say `connection: close`, and is not used again once idle for
//! [`IDLE_LIMIT`], or once its far end closed it.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Below the server's `idle_timeout_secs` (75 s by default), so that this
/// side stops using an idle connection first: a request sent as the server
/// closes one fails.
const IDLE_LIMIT: Duration = Duration::from_secs(50);

/// Idle connections kept at most; a worker's fetches, acks and heartbeats
/// use a few at once.
const KEPT_CONNECTIONS: usize = 64;

/// The longest answer head taken.
const MAX_HEAD_BYTES: usize = 64 * 1024;

const MAX_HEADERS: usize = 64;

/// Requests up to this long are written with their head in one write:
/// one segment for the small requests that wait on each other.
const ONE_WRITE_BYTES: usize = 16 * 1024;

/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an exchange failed: the server could not be reached or went away
/// (`Io`), or its answer was not HTTP this client reads (`Protocol`).
#[derive(Debug)]
pub(crate) enum Failure {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// One request: its method, its target (path and query), its headers
/// other than `host` and `content-length`, and its body.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub body: &'a [u8],
}

/// Connections to one server.
#[derive(Debug)]
pub(crate) struct Plain {
    /// `host:port` to connect to.
    address: String,
    /// The `host` header's value.
    host: String,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Plain {
    /// For `http://` URLs, given as parsed; `None` for any other scheme.
    pub fn for_url(url: &reqwest::Url) -> Option<Self> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        Some(Self {
            address: format!("{host}:{port}"),
            host: match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` and reads its answer's body into `body`; the answer's
    /// status.
    pub async fn exchange(
        &self,
        request: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> Result<u16, Failure> {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(request.method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(request.target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.host.as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in &request.headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        if !request.body.is_empty() || !matches!(request.method, "GET" | "HEAD") {
            head.extend_from_slice(
                format!("content-length: {}\r\n", request.body.len()).as_bytes(),
            );
        }
        head.extend_from_slice(b"\r\n");
        let mut stream = match self.take_idle() {
            Some(stream) => stream,
            None => self.connect().await?,
        };
        if request.body.len() <= ONE_WRITE_BYTES {
            head.extend_from_slice(request.body);
            stream.write_all(&head).await?;
        } else {
            stream.write_all(&head).await?;
            stream.write_all(request.body).await?;
        }
        let (status, keep) = read_answer(&mut stream, body).await?;
        if keep {
            self.keep(stream);
        }
        Ok(status)
    }

    /// The most recently used idle connection still open, if any.
    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((stream, since)) = idle.pop() {
            if since.elapsed() >= IDLE_LIMIT {
                // The older ones have been idle longer still.
                idle.clear();
                return None;
            }
            // Nothing is due on an idle connection: a byte to read, or its
            // end, means the server closed it (or broke the protocol).
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(stream),
                _ => {}
            }
        }
        None
    }

    fn keep(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < KEPT_CONNECTIONS {
            idle.push((stream, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<TcpStream, Failure> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
                )
            })??;
        stream.set_nodelay(true)?;
        // A connection whose far end stopped acknowledging anything (its
        // host gone, a partition) is closed by the kernel within about half
        // a minute, also under a request without a timeout of its own:
        // probed once idle, and nothing sent left unacknowledged longer.
        let socket = socket2::SockRef::from(&stream);
        socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(15))
                .with_interval(Duration::from_secs(5)),
        )?;
        #[cfg(target_os = "linux")]
        socket.set_tcp_user_timeout(Some(Duration::from_secs(30)))?;
        Ok(stream)
    }
}

/// Reads one answer: its status, and whether the connection may carry
/// another request. Its body goes into `body`.
async fn read_answer(stream: &mut TcpStream, body: &mut Vec<u8>) -> Result<(u16, bool), Failure> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let (status, length, keep, head_len) = loop {
            if let Some(parsed) = parse_head(&buf)? {
                break parsed;
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(Failure::Protocol(format!(
                    "an answer's head longer than {MAX_HEAD_BYTES} bytes"
                )));
            }
            if read_more(stream, &mut buf).await? == 0 {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection before its answer",
                )));
            }
        };
        buf.drain(..head_len);
        // An informational answer (100 Continue, never asked for) is
        // followed by the real one.
        if (100..200).contains(&status) {
            continue;
        }
        let whole = match length {
            Length::Bytes(n) => {
                let n = usize::try_from(n)
                    .map_err(|_| Failure::Protocol(format!("an answer of {n} bytes")))?;
                body.reserve(n.min(super::KEPT_BUFFER_BYTES));
                read_exact_body(stream, &mut buf, body, n).await?;
                true
            }
            Length::Chunked => {
                read_chunked(stream, &mut buf, body).await?;
                true
            }
            Length::ToEnd => {
                body.extend_from_slice(&buf);
                stream.read_to_end(body).await?;
                false
            }
        };
        // Bytes past the answer were never asked for.
        return Ok((status, whole && keep && buf.is_empty()));
    }
}

enum Length {
    Bytes(u64),
    Chunked,
    ToEnd,
}

/// The answer's status, body length, whether it keeps the connection, and
/// its head's length, once `buf` holds its whole head.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, Length, bool, usize)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let head_len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(Failure::Protocol(format!(
                "an answer that is not HTTP: {e}"
            )));
        }
    };
    let status = answer.code.unwrap_or(0);
    let mut keep = answer.version == Some(1);
    let mut length = Length::ToEnd;
    for header in answer.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Failure::Protocol("an answer with a broken content-length".into())
                })?;
            if !matches!(length, Length::Chunked) {
                length = Length::Bytes(n);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let chunked = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            length = if chunked {
                Length::Chunked
            } else {
                Length::ToEnd
            };
        } else if header.name.eq_ignore_ascii_case("connection")
            && header
                .value
                .split(|b| *b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep = false;
        }
    }
    // No body whatever the headers say (RFC 9110 §6.4.1).
    if status == 204 || status == 304 {
        length = Length::Bytes(0);
    }
    Ok(Some((status, length, keep, head_len)))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(8192);
    }
    stream.read_buf(buf).await
}

fn cut_short() -> Failure {
    Failure::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection within its answer",
    ))
}

/// Moves `n` bytes of body into `body`: those already read into `buf`
/// first, the rest straight from the connection.
async fn read_exact_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    body: &mut Vec<u8>,
    n: usize,
) -> Result<(), Failure> {
    let from_buf = n.min(buf.len());
    body.extend_from_slice(&buf[..from_buf]);
    buf.drain(..from_buf);
    let mut left = n - from_buf;
    while left > 0 {
        let before = body.len();
        let read = (&mut *stream).take(left as u64).read_buf(body).await?;
        if read == 0 {
            return Err(cut_short());
        }
        left -= body.len() - before;
    }
    Ok(())
}

/// A line ending in CRLF from `buf`, read further as needed, without it.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, Failure> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Failure::Protocol("a chunk's size line too long".into()));
        }
        if read_more(stream, buf).await? == 0 {
            return Err(cut_short());
        }
    }
}

async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    body: &mut Vec<u8>,
) -> Result<(), Failure> {
    loop {
        let line = read_line(stream, buf).await?;
        // Chunk extensions, after a `;`, say nothing this client needs.
        let size = line.split(|b| *b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| Failure::Protocol("a chunk with a broken size".into()))?;
        if size == 0 {
            // Trailers, then the empty line that ends the answer.
            while !read_line(stream, buf).await?.is_empty() {}
            return Ok(());
        }
        read_exact_body(stream, buf, body, size).await?;
        if !read_line(stream, buf).await?.is_empty() {
            return Err(Failure::Protocol("a chunk longer than its size".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpListener;

    use super::*;

    /// After an answer, the scripted server keeps its connection for the
    /// next request, or closes it without a word.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        Keep,
        Close,
    }

    /// A server that answers each request with the next of `answers` (raw
    /// bytes), on whatever connection it comes, counting the connections
    /// it took.
    async fn scripted(answers: Vec<(&'static [u8], Then)>) -> (Plain, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                while let Some(request_len) = whole_request(&mut socket, &mut buf).await {
                    buf.drain(..request_len);
                    let Some((answer, then)) = answers.next() else {
                        return;
                    };
                    socket.write_all(answer).await.unwrap();
                    if then == Then::Close {
                        break;
                    }
                }
            }
        });
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/prefix")).unwrap();
        (Plain::for_url(&url).unwrap(), accepted)
    }

    /// The length of the next whole request in `buf` (its head and the body
    /// its content-length says), read further as needed; `None` at the
    /// connection's end.
    async fn whole_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.parse().unwrap());
                if buf.len() >= end + 4 + body {
                    return Some(end + 4 + body);
                }
            }
            if socket.read_buf(buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    async fn answer(plain: &Plain) -> Result<(u16, Vec<u8>), Failure> {
        let request = Request {
            method: "POST",
            target: "/prefix/v1/tasks",
            headers: vec![("content-type", b"application/json")],
            body: b"{}",
        };
        let mut body = Vec::new();
        let status = plain.exchange(&request, &mut body).await?;
        Ok((status, body))
    }

    #[tokio::test]
    async fn answers_of_each_length_are_read_whole_and_the_connection_kept() {
        let (plain, accepted) = scripted(vec![
            (b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello", Then::Keep),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n",
                Then::Keep,
            ),
            (b"HTTP/1.1 204 No Content\r\ncontent-length: 12\r\n\r\n", Then::Keep),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\ncontent-length: 2\r\n\r\n{}",
                Then::Keep,
            ),
        ])
        .await;
        assert_eq!(answer(&plain).await.unwrap(), (201, b"hello".to_vec()));
        assert_eq!(answer(&plain).await.unwrap(), (200, b"abcde".to_vec()));
        assert_eq!(answer(&plain).await.unwrap(), (204, Vec::new()));
        assert_eq!(answer(&plain).await.unwrap(), (409, b"{}".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
    }

    #[tokio::test]
    async fn a_connection_that_ends_with_its_answer_is_not_used_again() {
        let (plain, accepted) = scripted(vec![
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na",
                Then::Close,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nread to the end", Then::Close),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc", Then::Keep),
        ])
        .await;
        assert_eq!(answer(&plain).await.unwrap(), (200, b"a".to_vec()));
        assert_eq!(
            answer(&plain).await.unwrap(),
            (200, b"read to the end".to_vec())
        );
        assert_eq!(answer(&plain).await.unwrap(), (200, b"c".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_replaced_before_a_request() {
        let (plain, accepted) = scripted(vec![
            // Closed without a word: kept here, as the server's idle
            // timeout would close it.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na",
                Then::Close,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb", Then::Keep),
        ])
        .await;
        assert_eq!(answer(&plain).await.unwrap(), (200, b"a".to_vec()));
        assert_eq!(plain.idle.lock().unwrap().len(), 1);
        // Its end reaches this side.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(answer(&plain).await.unwrap(), (200, b"b".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn broken_answers_are_errors_not_answers() {
        // Answers that are not HTTP this client reads are protocol errors;
        // answers the server cut short by closing are the connection's.
        let (not_http, cut_short) = (true, false);
        let cases: [(&[u8], Then, bool); 8] = [
            (b"not http at all\r\n\r\n", Then::Keep, not_http),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                Then::Keep,
                not_http,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                Then::Keep,
                not_http,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n",
                Then::Keep,
                not_http,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                Then::Close,
                cut_short,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                Then::Close,
                cut_short,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-le", Then::Close, cut_short),
            (b"", Then::Close, cut_short),
        ];
        for (broken, then, expected) in cases {
            let (plain, _) = scripted(vec![(broken, then)]).await;
            let failure = answer(&plain).await.expect_err("a broken answer");
            assert!(
                matches!(failure, Failure::Protocol(_)) == expected,
                "{}: {failure:?}",
                String::from_utf8_lossy(broken)
            );
        }
    }
}

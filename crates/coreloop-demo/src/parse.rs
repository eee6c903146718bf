//! Parsing of what a client sends, without I/O: request heads (with `httparse`) and the
//! framing of request bodies (`Content-Length` or `chunked`). The statuses they return for
//! bad input are listed in the documentation of [`serve`](crate::serve).

use crate::limits::{Limits, MAX_HEADERS_CAP};

/// Longest chunk-size line of a chunked body (the size and any extensions).
const MAX_CHUNK_LINE: usize = 4096;

// ---------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------

/// A request head, parsed.
pub(crate) struct Request {
    pub(crate) method: Method,
    pub(crate) path: String,
    /// HTTP/1.x minor version.
    pub(crate) version: u8,
    pub(crate) keep_alive: bool,
    pub(crate) expect_continue: bool,
    /// Bytes of the head, from the start of the input (empty lines before it included).
    pub(crate) head_len: usize,
    pub(crate) body: Body,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    Empty,
    Length(u64),
    Chunked,
}

/// What the input holds so far.
pub(crate) enum Head {
    /// Not a complete head yet (and within the limits).
    Partial,
    /// A head refused with this status.
    Bad(u16),
    Request(Request),
}

/// Parses the request head at the start of `input`, within `limits`.
pub(crate) fn parse_head(input: &[u8], limits: &Limits) -> Head {
    if input.is_empty() {
        return Head::Partial;
    }
    // The request line (after any empty lines, which are ignored).
    let start = input
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(input.len());
    let line = &input[start..];
    let line_len = match line.iter().position(|&b| b == b'\n') {
        Some(end) => end - usize::from(end > 0 && line[end - 1] == b'\r'),
        None => line.len(),
    };
    if line_len > limits.max_request_line {
        return Head::Bad(414);
    }

    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req =
        httparse::Request::new(&mut storage[..limits.max_headers.clamp(1, MAX_HEADERS_CAP)]);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if input.len() > limits.max_header_bytes {
                Head::Bad(431)
            } else {
                Head::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Head::Bad(431),
        Err(_) => return Head::Bad(400),
    };
    if head_len > limits.max_header_bytes {
        return Head::Bad(431);
    }
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut expect_continue = false;
    let mut content_length: Option<u64> = None;
    let mut codings = Codings::default();
    for header in req.headers.iter() {
        let value = header.value.trim_ascii();
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            // Digits only: no sign, no list, no spaces inside.
            let Some(len) = parse_decimal(value) else {
                return Head::Bad(400);
            };
            if content_length.is_some_and(|prev| prev != len) {
                return Head::Bad(400);
            }
            content_length = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(value);
        } else if header.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                // HTTP/1.0 clients do not wait for it (RFC 9110 §10.1.1).
                expect_continue = version == 1;
            } else {
                return Head::Bad(417);
            }
        }
    }
    let body = if codings.present {
        if version == 0 || content_length.is_some() {
            return Head::Bad(400);
        }
        if codings.chunked != 1 || !codings.last_chunked || codings.empty {
            return Head::Bad(400);
        }
        if codings.unknown {
            return Head::Bad(501);
        }
        Body::Chunked
    } else {
        match content_length {
            None | Some(0) => Body::Empty,
            Some(len) if len > limits.max_body_bytes => return Head::Bad(413),
            Some(len) => Body::Length(len),
        }
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    Head::Request(Request {
        method,
        path: req.path.unwrap_or("/").to_owned(),
        version,
        keep_alive,
        expect_continue,
        head_len,
        body,
    })
}

/// The transfer codings of a request, over all its `Transfer-Encoding` fields in order.
#[derive(Default)]
struct Codings {
    present: bool,
    chunked: usize,
    last_chunked: bool,
    unknown: bool,
    /// A field with no coding at all.
    empty: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        let mut any = false;
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            any = true;
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            self.chunked += usize::from(chunked);
            self.last_chunked = chunked;
            let known = [
                &b"gzip"[..],
                b"x-gzip",
                b"deflate",
                b"compress",
                b"x-compress",
            ]
            .iter()
            .any(|name| coding.eq_ignore_ascii_case(name));
            self.unknown |= !chunked && !known;
        }
        self.empty |= !any;
    }
}

/// A non-empty string of ASCII digits that fits in a `u64`.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Body framing state.
pub(crate) enum Decoder {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
}

/// Where a chunked body's decoder is.
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line; bytes of trailers so far.
    Trailers(usize),
}

impl Decoder {
    /// Consumes what belongs to the body at the start of `input`. Returns the bytes used
    /// and whether the body is complete, or the status that refuses it.
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        received: &mut u64,
        limits: &Limits,
    ) -> Result<(usize, bool), u16> {
        let chunk = match self {
            Decoder::Length(remaining) => {
                let take = (*remaining).min(input.len() as u64);
                *remaining -= take;
                *received += take;
                // take <= input.len()
                return Ok((take as usize, *remaining == 0));
            }
            Decoder::Chunked(chunk) => chunk,
        };
        let mut at = 0usize;
        loop {
            let rest = &input[at..];
            match chunk {
                Chunk::Size => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        return if rest.len() > MAX_CHUNK_LINE {
                            Err(400)
                        } else {
                            Ok((at, false))
                        };
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(400);
                    }
                    let size = parse_chunk_size(&rest[..end]).ok_or(400u16)?;
                    at += end + 1;
                    *received = received.checked_add(size).ok_or(413u16)?;
                    if *received > limits.max_body_bytes {
                        return Err(413);
                    }
                    *chunk = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let take = (*left).min(rest.len() as u64);
                    *left -= take;
                    at += take as usize;
                    if *left > 0 {
                        return Ok((at, false));
                    }
                    *chunk = Chunk::DataEnd;
                }
                Chunk::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        at += 2;
                        *chunk = Chunk::Size;
                    }
                    [] | [b'\r'] => return Ok((at, false)),
                    _ => return Err(400),
                },
                Chunk::Trailers(total) => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        return if *total + rest.len() > limits.max_header_bytes {
                            Err(431)
                        } else {
                            Ok((at, false))
                        };
                    };
                    let line = rest[..end].strip_suffix(b"\r").ok_or(400u16)?;
                    at += end + 1;
                    if line.is_empty() {
                        return Ok((at, true));
                    }
                    *total += end + 1;
                    if *total > limits.max_header_bytes {
                        return Err(431);
                    }
                    if !is_field_line(line) {
                        return Err(400);
                    }
                }
            }
        }
    }
}

/// `chunk-size [ BWS ";" chunk-ext ] CR` (the LF is cut off): 1 to 16 hex digits, then
/// optionally extensions, which are ignored but may not hold control characters.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let size = line[..digits].iter().fold(0u64, |acc, &d| {
        // At most 16 hex digits: no overflow.
        (acc << 4) | u64::from((d as char).to_digit(16).unwrap_or(0))
    });
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    match rest.first() {
        None => Some(size),
        Some(b';') if !rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) => Some(size),
        Some(_) => None,
    }
}

/// `name ":" value`, with a non-empty token for a name.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    colon > 0
        && line[..colon]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

//! The chunked transfer coding (RFC 9112 section 7.1), decoded incrementally: bytes go
//! in as they arrive, in pieces of any size, and come out as where the data is and
//! whether the body has ended. The framing is checked strictly (hex sizes that fit in 64
//! bits, CRLF only, extensions and trailer fields of visible characters, bounded line
//! lengths), so a body Tether forwards as it was received frames the same way for the
//! backend as it did for Tether.

use std::ops::Range;

/// The longest chunk-size line, extensions included.
pub const MAX_SIZE_LINE: u32 = 4096;
/// The most bytes of trailer fields.
pub const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the hex digits of a chunk size; `digits` counts them.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeSpace,
    /// In chunk extensions, to CR.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// In chunk data, `remaining` bytes to go.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    Done,
}

/// Why chunked framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A chunk size that is not hex digits, or too large for 64 bits.
    BadSize,
    /// A byte that does not belong in a chunk extension.
    BadExtension,
    /// A size line over [`MAX_SIZE_LINE`].
    LineTooLong,
    /// CR without LF, LF without CR, or chunk data not followed by CRLF.
    BadLineEnd,
    /// A malformed trailer field line (obsolete folding included).
    BadTrailer,
    /// Trailer fields over [`MAX_TRAILERS`].
    TrailersTooLarge,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Error::BadSize => "invalid chunk size",
            Error::BadExtension => "invalid chunk extension",
            Error::LineTooLong => "chunk size line too long",
            Error::BadLineEnd => "chunk framing without CRLF",
            Error::BadTrailer => "invalid trailer field",
            Error::TrailersTooLarge => "trailer fields too large",
        })
    }
}

/// What one [`Decoder::step`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input used, framing and data; the rest is for the next step (or,
    /// once `done`, the next message).
    pub consumed: usize,
    /// Where in the input chunk data was found (empty if none was).
    pub data: Range<usize>,
    /// The body ended with this step: the last chunk and trailer section are complete.
    pub done: bool,
}

/// The state of one chunked body being decoded.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// The chunk size being read, then the data left of that chunk.
    remaining: u64,
    digits: u8,
    /// Bytes of the current size line, or of all trailer lines so far.
    line: u32,
    /// Chunk data so far.
    total: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes a chunk extension or a field value may hold: visible characters, obs-text,
/// space and tab.
fn is_text(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl Decoder {
    pub const fn new() -> Decoder {
        Decoder { state: State::Size, remaining: 0, digits: 0, line: 0, total: 0 }
    }

    /// The body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Chunk data decoded so far, in bytes.
    pub fn data_len(&self) -> u64 {
        self.total
    }

    /// Reads framing from the start of `input` until it reaches chunk data (returned as a
    /// range, as much of it as `input` holds), the end of the body, or the end of `input`.
    /// Call again with the input after `consumed` to go on.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, Error> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    self.remaining -= n as u64;
                    self.total += n as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Step { consumed: i + n, data: i..i + n, done: false });
                }
                State::Done => break,
                _ => self.frame(b)?,
            }
            i += 1;
            if self.state == State::Done {
                return Ok(Step { consumed: i, data: i..i, done: true });
            }
        }
        Ok(Step { consumed: i, data: i..i, done: self.state == State::Done })
    }

    /// One byte of framing.
    fn frame(&mut self, b: u8) -> Result<(), Error> {
        match self.state {
            State::Size | State::SizeSpace | State::Extension => {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(Error::LineTooLong);
                }
            }
            State::TrailerStart | State::TrailerName | State::TrailerValue | State::TrailerLf | State::EndLf => {
                self.line += 1;
                if self.line > MAX_TRAILERS {
                    return Err(Error::TrailersTooLarge);
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::Size, b) if b.is_ascii_hexdigit() => {
                if self.remaining >> 60 != 0 {
                    return Err(Error::BadSize);
                }
                self.remaining = self.remaining << 4 | u64::from(hex(b));
                self.digits = self.digits.saturating_add(1);
                State::Size
            }
            (State::Size, _) if self.digits == 0 => return Err(Error::BadSize),
            (State::Size | State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
            (State::Size | State::SizeSpace | State::Extension, b';') => State::Extension,
            (State::Size | State::SizeSpace | State::Extension, b'\r') => State::SizeLf,
            (State::Size | State::SizeSpace | State::Extension, b'\n') => return Err(Error::BadLineEnd),
            (State::Size | State::SizeSpace, _) => return Err(Error::BadSize),
            (State::Extension, b) if is_text(b) => State::Extension,
            (State::Extension, _) => return Err(Error::BadExtension),
            (State::SizeLf, b'\n') => {
                self.line = 0;
                self.digits = 0;
                if self.remaining == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size,
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerName, b) if is_tchar(b) => State::TrailerName,
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerStart | State::TrailerName, _) => return Err(Error::BadTrailer),
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, b) if is_text(b) => State::TrailerValue,
            (State::TrailerValue, _) => return Err(Error::BadTrailer),
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => State::Done,
            (State::SizeLf | State::DataCr | State::DataLf | State::TrailerLf | State::EndLf, _) => {
                return Err(Error::BadLineEnd)
            }
            (State::Data | State::Done, _) => unreachable!("data and the end are not framing"),
        };
        Ok(())
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `piece` bytes: the data, and the bytes left after
    /// the body.
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), Error> {
        let mut d = Decoder::new();
        let mut data = Vec::new();
        let mut at = 0;
        let mut fed = 0;
        while !d.is_done() {
            if at == fed {
                if fed == input.len() {
                    break;
                }
                fed = (fed + piece).min(input.len());
            }
            let step = d.step(&input[at..fed])?;
            data.extend_from_slice(&input[at..fed][step.data.clone()]);
            at += step.consumed;
        }
        assert!(d.is_done(), "incomplete: {:?}", String::from_utf8_lossy(input));
        assert_eq!(d.data_len(), data.len() as u64);
        Ok((data, input.len() - at))
    }

    #[test]
    fn decodes_in_any_pieces() {
        let body = b"5\r\nhello\r\n7;name=\"v a\";x\r\n, world\r\nA\r\n0123456789\r\n000\r\nTrailer: yes\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, 64, 1000] {
            let (data, left) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello, world0123456789", "piece {piece}");
            assert_eq!(left, 4);
        }
    }

    #[test]
    fn the_smallest_body() {
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), (vec![], 0));
    }

    #[test]
    fn incomplete_bodies_wait() {
        let mut d = Decoder::new();
        let s = d.step(b"5\r\nhel").unwrap();
        assert_eq!((s.consumed, s.data.clone(), s.done), (6, 3..6, false));
        assert!(!d.step(b"lo\r\n0\r\n").unwrap().done);
        assert!(!d.is_done());
    }

    #[test]
    fn refuses_bad_framing() {
        let cases: &[(&[u8], Error)] = &[
            (b"x\r\n", Error::BadSize),
            (b"\r\n", Error::BadSize),
            (b"-1\r\n", Error::BadSize),
            (b"+1\r\n", Error::BadSize),
            (b"0x1\r\n", Error::BadSize),
            (b"1 1\r\n", Error::BadSize),
            (b"10000000000000000\r\n", Error::BadSize),
            (b"5\nhello\r\n", Error::BadLineEnd),
            (b"5\r\nhello\n0\r\n\r\n", Error::BadLineEnd),
            (b"5\r\nhelloX\r\n", Error::BadLineEnd),
            (b"5\rX", Error::BadLineEnd),
            (b"0\r\n\n", Error::BadTrailer),
            (b"1;a\0\r\n", Error::BadExtension),
            (b"0\r\nX: 1\n\r\n", Error::BadTrailer),
            (b"0\r\nX: 1\r\n folded\r\n\r\n", Error::BadTrailer),
            (b"0\r\nX : 1\r\n\r\n", Error::BadTrailer),
            (b"0\r\nX: \x01\r\n\r\n", Error::BadTrailer),
        ];
        for (input, want) in cases {
            assert_eq!(decode(input, 1).unwrap_err(), *want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(decode(input, 100).unwrap_err(), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn the_largest_size_fits_and_lines_are_bounded() {
        let mut d = Decoder::new();
        d.step(b"FFFFFFFFFFFFFFFF\r\n").unwrap();
        assert_eq!(d.remaining, u64::MAX);
        let long = format!("1;{}\r\n", "a".repeat(MAX_SIZE_LINE as usize));
        assert_eq!(Decoder::new().step(long.as_bytes()).unwrap_err(), Error::LineTooLong);
        let trailers = format!("0\r\nX: {}\r\n\r\n", "a".repeat(MAX_TRAILERS as usize));
        assert_eq!(Decoder::new().step(trailers.as_bytes()).unwrap_err(), Error::TrailersTooLarge);
    }
}

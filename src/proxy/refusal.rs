//! Every way a request can fail in Tether's hands, in one place: the status, the
//! `Tether-Error` label and the message each one gets. A response Tether writes itself is
//! made only by [`reply`](super::request::reply) from a [`Refusal`].

use std::time::Duration;

use http::StatusCode;

use crate::affinity::verdict::Reason;
use crate::upstream::ConnectError;

/// Why Tether answers a request itself instead of with a backend's response.
#[derive(Debug)]
pub enum Refusal {
    /// `CONNECT`: Tether is a reverse proxy.
    ConnectUnsupported,
    /// The listener serves only HTTPS: the client is sent to `location`.
    HttpsRedirect {
        location: String,
    },
    /// A request Tether cannot make sense of (missing or malformed `Host`, a target form
    /// its method does not allow, `chunked` applied twice, ...).
    BadRequest(&'static str),
    /// A request target longer than `limits.max_request_target`.
    TargetTooLong {
        limit: u32,
    },
    /// A request body larger than `limits.max_request_body`: known from `Content-Length`
    /// before anything is sent, or found while a chunked body streams.
    BodyTooLarge {
        limit: u64,
    },
    /// A request head longer than `limits.max_request_head`, or with too many fields.
    HeadTooLarge {
        limit: u32,
    },
    /// An HTTP version other than 1.0 and 1.1 on an HTTP/1 connection.
    VersionUnsupported,
    /// A request transfer coding other than `chunked` (RFC 9112 section 6.1: a server
    /// SHOULD answer 501 to a coding it does not understand).
    UnsupportedTransferCoding,
    /// The listener this connection came in on was removed by a reload.
    NoListener,
    NoRoute {
        host: String,
        path: String,
    },
    /// The session's backend is unavailable and the pool is `strict`.
    SessionUnavailable(Reason),
    NoBackend,
    QueueFull {
        backend: String,
        max_queue: u32,
    },
    QueueTimeout {
        backend: String,
        waited: Duration,
    },
    /// No connection to the backend (and no other backend to move to).
    Connect {
        backend: String,
        error: ConnectError,
    },
    /// The backend's connection broke before a response head. What hyper said is logged,
    /// never shown to the client.
    BackendFailed {
        backend: String,
    },
    BackendTimeout {
        backend: String,
        after: Duration,
    },
    /// A `101 Switching Protocols` to a request that asked for no upgrade.
    UnaskedSwitch,
    /// Reading the client's request body failed (malformed chunked encoding, a client
    /// that went away mid-upload): the client's fault, never the backend's.
    BadRequestBody,
    /// The backend did not answer in time while it was still waiting for the client's
    /// request body: a slow upload, the client's fault.
    RequestBodyTimeout {
        after: Duration,
    },
}

impl Refusal {
    /// Where a redirect sends the client (`Location`).
    pub fn location(&self) -> Option<&str> {
        match self {
            Refusal::HttpsRedirect { location } => Some(location),
            _ => None,
        }
    }

    /// The address of the same resource over HTTPS on `port`: `host` is the request's
    /// (a port on it is replaced), `target` its origin-form path and query.
    pub fn https_redirect(host: &str, port: u16, target: &str) -> Refusal {
        let host = crate::net::strip_port(host);
        let location =
            if port == 443 { format!("https://{host}{target}") } else { format!("https://{host}:{port}{target}") };
        Refusal::HttpsRedirect { location }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ConnectUnsupported => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::HttpsRedirect { .. } => StatusCode::PERMANENT_REDIRECT,
            Refusal::BadRequest(_) | Refusal::BadRequestBody => StatusCode::BAD_REQUEST,
            Refusal::TargetTooLong { .. } => StatusCode::URI_TOO_LONG,
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Refusal::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::VersionUnsupported => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            Refusal::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Refusal::NoRoute { .. } => StatusCode::NOT_FOUND,
            Refusal::NoListener
            | Refusal::SessionUnavailable(_)
            | Refusal::NoBackend
            | Refusal::QueueFull { .. }
            | Refusal::QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Connect { error: ConnectError::Timeout(_), .. } | Refusal::BackendTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Refusal::Connect { .. } | Refusal::BackendFailed { .. } | Refusal::UnaskedSwitch => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `Tether-Error` header value and the access log's error field.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::ConnectUnsupported => "connect-unsupported",
            Refusal::HttpsRedirect { .. } => "https-redirect",
            Refusal::BadRequest(_) => "bad-request",
            Refusal::TargetTooLong { .. } => "target-too-long",
            Refusal::BodyTooLarge { .. } => "body-too-large",
            Refusal::UnsupportedTransferCoding => "transfer-coding-unsupported",
            Refusal::HeadTooLarge { .. } => "head-too-large",
            Refusal::VersionUnsupported => "version-unsupported",
            Refusal::BadRequestBody => "bad-request-body",
            Refusal::RequestBodyTimeout { .. } => "request-body-timeout",
            Refusal::NoListener => "no-listener",
            Refusal::NoRoute { .. } => "no-route",
            Refusal::SessionUnavailable(_) => "session-unavailable",
            Refusal::NoBackend => "no-backend",
            Refusal::QueueFull { .. } => "queue-full",
            Refusal::QueueTimeout { .. } => "queue-timeout",
            Refusal::Connect { error: ConnectError::Timeout(_), .. } => "connect-timeout",
            Refusal::Connect { .. } => "connect-failed",
            Refusal::BackendFailed { .. } | Refusal::UnaskedSwitch => "backend-error",
            Refusal::BackendTimeout { .. } => "backend-timeout",
        }
    }

    /// What went wrong, in words, for the response body; `pool` names the routed pool.
    /// It names Tether's pool and backend but never says what the operating system or
    /// hyper said: that detail goes to the log only.
    pub fn message(&self, pool: &str) -> String {
        match self {
            Refusal::ConnectUnsupported => "CONNECT is not supported: Tether is a reverse proxy".into(),
            Refusal::HttpsRedirect { location } => format!("this listener serves HTTPS only: {location}"),
            Refusal::BadRequest(why) => (*why).into(),
            Refusal::TargetTooLong { limit } => format!("the request target is longer than {limit} bytes"),
            Refusal::BodyTooLarge { limit } => {
                format!("pool \"{pool}\": the request body is larger than {limit} bytes")
            }
            Refusal::UnsupportedTransferCoding => "only the chunked transfer coding is supported".into(),
            Refusal::HeadTooLarge { limit } => {
                format!("the request head is longer than {limit} bytes or has too many fields")
            }
            Refusal::VersionUnsupported => "only HTTP/1.0, HTTP/1.1 and HTTP/2 are supported".into(),
            Refusal::NoListener => "this listener was removed".into(),
            Refusal::NoRoute { host, path } => format!("no route for host \"{host}\" and path \"{path}\""),
            Refusal::SessionUnavailable(reason) => format!(
                "pool \"{pool}\": the session's backend is unavailable ({}) and this pool does not move sessions",
                crate::affinity::verdict::Verdict::Repin(*reason).reason().unwrap_or("")
            ),
            Refusal::NoBackend => format!("pool \"{pool}\": no backend is available"),
            Refusal::QueueFull { backend, max_queue } => {
                format!(
                    "pool \"{pool}\": backend \"{backend}\" is at max_connections and its queue of {max_queue} is full"
                )
            }
            Refusal::QueueTimeout { backend, waited } => format!(
                "pool \"{pool}\": backend \"{backend}\" is at max_connections and no slot freed within {waited:?}"
            ),
            Refusal::Connect { backend, error: ConnectError::Timeout(after) } => {
                format!("pool \"{pool}\": could not connect to backend \"{backend}\" within {after:?}")
            }
            Refusal::Connect { backend, .. } => format!("pool \"{pool}\": could not connect to backend \"{backend}\""),
            Refusal::BackendFailed { backend } => {
                format!("pool \"{pool}\": backend \"{backend}\" failed before responding")
            }
            Refusal::BackendTimeout { backend, after } => {
                format!("pool \"{pool}\": backend \"{backend}\" did not answer within {after:?}")
            }
            Refusal::UnaskedSwitch => "the backend switched protocols without being asked".into(),
            Refusal::BadRequestBody => format!("pool \"{pool}\": the request body could not be read"),
            Refusal::RequestBodyTimeout { after } => {
                format!("pool \"{pool}\": the request body did not arrive within {after:?}")
            }
        }
    }
}

impl Refusal {
    /// The refusal for a request that got no slot of backend `i` of `pool`.
    pub fn of_slot(e: crate::pool::NoSlot, pool: &crate::pool::Pool, i: usize) -> Refusal {
        let backend = pool.backends[i].name.clone();
        match e {
            crate::pool::NoSlot::QueueFull => Refusal::QueueFull { backend, max_queue: pool.config.max_queue },
            crate::pool::NoSlot::QueueTimeout => Refusal::QueueTimeout { backend, waited: pool.config.queue_timeout },
        }
    }

    /// The refusal for a request head Tether's codec would not accept.
    pub fn of_head(e: crate::h1::request::Error, limits: &crate::config::Limits) -> Refusal {
        use crate::h1::request::Error;
        match e {
            Error::HeadTooLarge => Refusal::HeadTooLarge { limit: limits.max_request_head },
            Error::TargetTooLong => Refusal::TargetTooLong { limit: limits.max_request_target },
            Error::Version => Refusal::VersionUnsupported,
            Error::UnsupportedCoding => Refusal::UnsupportedTransferCoding,
            other => Refusal::BadRequest(other.describe()),
        }
    }
}

/// Failures after the response head went out: logged, never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateFailure {
    /// The backend's response body broke off.
    BackendBody,
}

impl LateFailure {
    pub fn label(self) -> &'static str {
        match self {
            LateFailure::BackendBody => "backend-body-error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_faults_are_4xx_and_backend_faults_5xx() {
        let io = || ConnectError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let b = || "app-1".to_string();
        let cases = [
            (Refusal::ConnectUnsupported, 405, "connect-unsupported"),
            (Refusal::BadRequest("malformed Host header"), 400, "bad-request"),
            (Refusal::TargetTooLong { limit: 8192 }, 414, "target-too-long"),
            (Refusal::BodyTooLarge { limit: 10 }, 413, "body-too-large"),
            (Refusal::UnsupportedTransferCoding, 501, "transfer-coding-unsupported"),
            (Refusal::HeadTooLarge { limit: 65536 }, 431, "head-too-large"),
            (Refusal::VersionUnsupported, 505, "version-unsupported"),
            (Refusal::NoRoute { host: "x".into(), path: "/".into() }, 404, "no-route"),
            (Refusal::NoListener, 503, "no-listener"),
            (Refusal::SessionUnavailable(Reason::Down), 503, "session-unavailable"),
            (Refusal::NoBackend, 503, "no-backend"),
            (Refusal::QueueFull { backend: b(), max_queue: 3 }, 503, "queue-full"),
            (Refusal::QueueTimeout { backend: b(), waited: Duration::from_secs(1) }, 503, "queue-timeout"),
            (
                Refusal::Connect { backend: b(), error: ConnectError::Timeout(Duration::from_secs(1)) },
                504,
                "connect-timeout",
            ),
            (Refusal::Connect { backend: b(), error: io() }, 502, "connect-failed"),
            (Refusal::BackendFailed { backend: b() }, 502, "backend-error"),
            (Refusal::BackendTimeout { backend: b(), after: Duration::from_secs(1) }, 504, "backend-timeout"),
            (Refusal::UnaskedSwitch, 502, "backend-error"),
            (Refusal::BadRequestBody, 400, "bad-request-body"),
            (Refusal::RequestBodyTimeout { after: Duration::from_secs(1) }, 408, "request-body-timeout"),
        ];
        for (r, status, label) in cases {
            assert_eq!((r.status().as_u16(), r.label()), (status, label), "{r:?}");
        }
        let m = Refusal::Connect { backend: b(), error: io() }.message("web");
        assert_eq!(m, "pool \"web\": could not connect to backend \"app-1\"", "no OS error text");
        let m = Refusal::SessionUnavailable(Reason::Drained).message("web");
        assert_eq!(
            m,
            "pool \"web\": the session's backend is unavailable (drained) and this pool does not move sessions"
        );
    }
}

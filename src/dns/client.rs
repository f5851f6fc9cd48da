//! Asking a name server: one query over UDP from a fresh socket (a port the kernel picks
//! at random) with a random id, retried over TCP when the answer comes truncated. A
//! packet that does not parse, or answers another question (id, name, type, class), is
//! ignored and the wait goes on, so a stray or spoofed datagram cannot answer for the
//! server. Servers are asked in order until one gives a definite answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use super::wire::{self, RData, Response, TYPE_A, TYPE_AAAA, TYPE_SRV};
use crate::config::{DnsKind, DnsSource, MAX_WEIGHT};

/// Why a lookup gave no addresses. The last good set stays in force on any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// No server answered within the timeout.
    Timeout,
    /// SERVFAIL, REFUSED or another error code (the number).
    ServerError(u8),
    /// The name does not exist.
    NxDomain,
    /// The name exists but has no records of the type asked for.
    Empty,
    /// The name cannot be asked (too long, an empty label).
    BadName,
    /// A socket error talking to the servers.
    Io(String),
}

impl LookupError {
    /// The short label of metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            LookupError::Timeout => "timeout",
            LookupError::ServerError(2) => "servfail",
            LookupError::ServerError(_) => "server_error",
            LookupError::NxDomain => "nxdomain",
            LookupError::Empty => "empty",
            LookupError::BadName => "bad_name",
            LookupError::Io(_) => "io",
        }
    }

    /// A failure of the servers or the network rather than an answer about the name.
    fn is_hard(&self) -> bool {
        !matches!(self, LookupError::NxDomain | LookupError::Empty)
    }
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Timeout => f.write_str("no name server answered in time"),
            LookupError::ServerError(2) => f.write_str("the name server failed (SERVFAIL)"),
            LookupError::ServerError(5) => f.write_str("the name server refused (REFUSED)"),
            LookupError::ServerError(c) => write!(f, "the name server answered with error code {c}"),
            LookupError::NxDomain => f.write_str("the name does not exist (NXDOMAIN)"),
            LookupError::Empty => f.write_str("the name has no records of that type"),
            LookupError::BadName => f.write_str("the name cannot be looked up"),
            LookupError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

/// The name servers to ask and how long to wait for each.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub servers: Vec<SocketAddr>,
    /// The wait for one server's answer (UDP, and the TCP retry each get it).
    pub timeout: Duration,
}

/// The largest UDP answer read; without EDNS a server sends at most 512 bytes.
const UDP_BUFFER: usize = 4096;

impl Resolver {
    /// Asks the servers in order for `name`'s records of `qtype`; the first definite
    /// answer (records, no records, or NXDOMAIN) wins.
    pub async fn query(&self, name: &str, qtype: u16) -> Result<Response, LookupError> {
        let mut last = LookupError::Timeout;
        for server in &self.servers {
            match self.ask(*server, name, qtype).await {
                Ok(r) if r.rcode == wire::RCODE_OK || r.rcode == wire::RCODE_NXDOMAIN => return Ok(r),
                Ok(r) => last = LookupError::ServerError(r.rcode),
                Err(LookupError::BadName) => return Err(LookupError::BadName),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One server: UDP, then TCP if the answer was truncated.
    async fn ask(&self, server: SocketAddr, name: &str, qtype: u16) -> Result<Response, LookupError> {
        let id = random_id();
        let query = wire::encode_query(id, name, qtype).map_err(|_| LookupError::BadName)?;
        let deadline = Instant::now() + self.timeout;
        let r = tokio::time::timeout_at(deadline, udp(server, &query, id, name, qtype))
            .await
            .map_err(|_| LookupError::Timeout)??;
        if !r.truncated {
            return Ok(r);
        }
        let id = random_id();
        let query = wire::encode_query(id, name, qtype).map_err(|_| LookupError::BadName)?;
        tokio::time::timeout(self.timeout, tcp(server, &query, id, name, qtype))
            .await
            .map_err(|_| LookupError::Timeout)?
    }

    /// The addresses `source` names now, each with its weight, sorted, without repeats.
    pub async fn lookup(&self, source: &DnsSource) -> Result<Vec<(SocketAddr, u32)>, LookupError> {
        let port = source.port.unwrap_or(0);
        let mut out: Vec<(SocketAddr, u32)> = match source.kind {
            DnsKind::A => self.addresses(&source.name, TYPE_A).await?,
            DnsKind::Aaaa => self.addresses(&source.name, TYPE_AAAA).await?,
            DnsKind::Both => {
                let (v4, v6) =
                    tokio::join!(self.addresses(&source.name, TYPE_A), self.addresses(&source.name, TYPE_AAAA));
                match (v4, v6) {
                    // A server failure on either side would drop half the set: keep the
                    // last good one instead.
                    (Err(e), _) | (_, Err(e)) if e.is_hard() => return Err(e),
                    (Err(e), Err(_)) => return Err(e),
                    (a, b) => a.unwrap_or_default().into_iter().chain(b.unwrap_or_default()).collect(),
                }
            }
            DnsKind::Srv => return self.srv(&source.name).await,
        }
        .into_iter()
        .map(|ip| (SocketAddr::new(ip, port), source.weight))
        .collect();
        out.sort();
        out.dedup_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// The addresses of `name` of `qtype` (A or AAAA); none is [`LookupError::Empty`].
    async fn addresses(&self, name: &str, qtype: u16) -> Result<Vec<IpAddr>, LookupError> {
        let r = self.query(name, qtype).await?;
        if r.rcode == wire::RCODE_NXDOMAIN {
            return Err(LookupError::NxDomain);
        }
        let ips: Vec<IpAddr> = r.records_for(name, qtype).iter().filter_map(|r| ip_of(&r.data)).collect();
        if ips.is_empty() {
            return Err(LookupError::Empty);
        }
        Ok(ips)
    }

    /// The targets of an SRV name with the lowest priority (the others are backups), each
    /// target's addresses from the answer's additional records or else looked up (A, then
    /// AAAA), weighted by the record's weight (0 counts as 1).
    async fn srv(&self, name: &str) -> Result<Vec<(SocketAddr, u32)>, LookupError> {
        let r = self.query(name, TYPE_SRV).await?;
        if r.rcode == wire::RCODE_NXDOMAIN {
            return Err(LookupError::NxDomain);
        }
        let records: Vec<(u16, u16, u16, String)> = r
            .records_for(name, TYPE_SRV)
            .iter()
            .filter_map(|rec| match &rec.data {
                // A target of "." says the service is not offered there.
                RData::Srv { priority, weight, port, target } if !target.is_empty() && *port != 0 => {
                    Some((*priority, *weight, *port, target.clone()))
                }
                _ => None,
            })
            .collect();
        let Some(best) = records.iter().map(|r| r.0).min() else { return Err(LookupError::Empty) };
        let mut out = Vec::new();
        for (_, weight, port, target) in records.iter().filter(|r| r.0 == best) {
            let weight = u32::from(*weight).clamp(1, MAX_WEIGHT);
            let mut ips: Vec<IpAddr> =
                r.additionals.iter().filter(|a| a.name == *target).filter_map(|a| ip_of(&a.data)).collect();
            if ips.is_empty() {
                ips = match self.addresses(target, TYPE_A).await {
                    Ok(ips) => ips,
                    Err(e) if e.is_hard() => return Err(e),
                    Err(_) => match self.addresses(target, TYPE_AAAA).await {
                        Ok(ips) => ips,
                        Err(e) if e.is_hard() => return Err(e),
                        Err(_) => Vec::new(),
                    },
                };
            }
            out.extend(ips.into_iter().map(|ip| (SocketAddr::new(ip, *port), weight)));
        }
        if out.is_empty() {
            return Err(LookupError::Empty);
        }
        out.sort();
        out.dedup_by_key(|(a, _)| *a);
        Ok(out)
    }
}

fn ip_of(d: &RData) -> Option<IpAddr> {
    match d {
        RData::A(a) => Some(IpAddr::V4(*a)),
        RData::Aaaa(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A query id from the system's random source (a guessable id makes spoofing easy).
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // Without the system's random source, a per-thread generator is still better than
    // a fixed id.
    if getrandom::fill(&mut b).is_err() {
        return crate::random::random_below(65536) as u16;
    }
    u16::from_be_bytes(b)
}

fn io(e: std::io::Error) -> LookupError {
    LookupError::Io(e.kind().to_string())
}

/// One UDP exchange: a new socket on a port the kernel picks, connected to the server so
/// that only its datagrams arrive; answers to anything else are skipped.
async fn udp(server: SocketAddr, query: &[u8], id: u16, name: &str, qtype: u16) -> Result<Response, LookupError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        // An ICMP "port unreachable" comes back as a refused receive: nobody listens there.
        let n = socket.recv(&mut buf).await.map_err(io)?;
        let Ok(r) = wire::parse(&buf[..n]) else { continue };
        if r.check(id, name, qtype).is_ok() {
            return Ok(r);
        }
    }
}

/// One TCP exchange (RFC 1035 section 4.2.2: each message preceded by its length).
async fn tcp(server: SocketAddr, query: &[u8], id: u16, name: &str, qtype: u16) -> Result<Response, LookupError> {
    let mut s = TcpStream::connect(server).await.map_err(io)?;
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&(query.len() as u16).to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg).await.map_err(io)?;
    loop {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.map_err(io)?;
        let Ok(r) = wire::parse(&buf) else { return Err(LookupError::Io("malformed answer over TCP".into())) };
        if r.check(id, name, qtype).is_ok() {
            return Ok(r);
        }
    }
}

/// The name servers of `/etc/resolv.conf` (port 53), or the local host's when it names
/// none, as the C library does.
pub fn system_servers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers = servers_of(&text);
    if servers.is_empty() {
        vec![(Ipv4Addr::LOCALHOST, 53).into(), (Ipv6Addr::LOCALHOST, 53).into()]
    } else {
        servers
    }
}

/// The `nameserver` lines of a resolv.conf text.
fn servers_of(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) cannot be used without its scope.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver ::1\nnameserver fe80::1%eth0\noptions ndots:5\n";
        assert_eq!(servers_of(text), ["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse::<SocketAddr>().unwrap()]);
        assert!(servers_of("").is_empty());
    }

    #[tokio::test]
    async fn a_stray_answer_is_ignored_and_the_real_one_taken() {
        // A server that first sends an answer with the wrong id, then garbage, then the
        // real answer: only the last may count.
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let q = &buf[..n];
            let reply = |id: [u8; 2], ip: [u8; 4]| {
                let mut p = q.to_vec();
                p[0..2].copy_from_slice(&id);
                p[2..4].copy_from_slice(&[0x81, 0x80]);
                p[6..8].copy_from_slice(&[0, 1]);
                p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                p.extend_from_slice(&ip);
                p
            };
            let wrong = [q[0] ^ 0xff, q[1]];
            server.send_to(&reply(wrong, [6, 6, 6, 6]), from).await.unwrap();
            server.send_to(&[0xff; 40], from).await.unwrap();
            server.send_to(&reply([q[0], q[1]], [10, 1, 2, 3]), from).await.unwrap();
        });
        let r = Resolver { servers: vec![addr], timeout: Duration::from_secs(5) };
        let source = DnsSource {
            name: "app.test".into(),
            port: Some(80),
            kind: DnsKind::A,
            interval: Duration::from_secs(1),
            weight: 2,
            max_connections: None,
        };
        let found = r.lookup(&source).await.unwrap();
        assert_eq!(found, [("10.1.2.3:80".parse().unwrap(), 2)]);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        // UDP answers with TC set and no records; TCP on the same port has the records.
        // The kernel's UDP port may be taken for TCP (by another test's socket): try others.
        let mut tries = 0;
        let (udp, addr, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, addr, tcp),
                Err(_) if tries < 50 => tries += 1,
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        };
        let reply = |q: &[u8], tc: bool| {
            let mut p = q.to_vec();
            p[2..4].copy_from_slice(&[if tc { 0x83 } else { 0x81 }, 0x80]);
            if !tc {
                p[6..8].copy_from_slice(&[0, 2]);
                for last in [7u8, 8] {
                    p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, last]);
                }
            }
            p
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = udp.recv_from(&mut buf).await.unwrap();
            udp.send_to(&reply(&buf[..n], true), from).await.unwrap();
        });
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut q).await.unwrap();
            let r = reply(&q, false);
            s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&r).await.unwrap();
        });
        let r = Resolver { servers: vec![addr], timeout: Duration::from_secs(5) };
        let source = DnsSource {
            name: "big.test".into(),
            port: Some(443),
            kind: DnsKind::A,
            interval: Duration::from_secs(1),
            weight: 1,
            max_connections: None,
        };
        let found = r.lookup(&source).await.unwrap();
        assert_eq!(found, [("10.0.0.7:443".parse().unwrap(), 1), ("10.0.0.8:443".parse().unwrap(), 1)]);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = Resolver { servers: vec![server.local_addr().unwrap()], timeout: Duration::from_millis(200) };
        assert_eq!(r.query("app.test", TYPE_A).await.unwrap_err(), LookupError::Timeout);
    }
}

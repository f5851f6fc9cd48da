//! Addresses: client IP normalisation, CIDR ranges and host names without ports.

use std::net::IpAddr;

/// An IP network such as `10.0.0.0/8`, used for trusted proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network; an IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Parses `10.0.0.0/8`, or a single address such as `::1` (a network of one).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("\"{s}\" is not an IP address or network like 10.0.0.0/8"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("\"{s}\": prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are treated as the IPv4 address they carry,
/// so a dual-stack listener matches the same networks as an IPv4 one.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// A host (as in a `Host` header or a route) without its port: `shop.example:8080` and
/// `shop.example` give `shop.example`, `[::1]:80` and `[::1]` give `::1`.
///
/// Only a trailing `:digits` is a port, and only when the rest has no colon, so a bare
/// IPv6 address such as `::1` or `fe80::1` is returned whole rather than cut at its last
/// colon. A `[` without a closing `]` is returned unchanged.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(c.contains(ip("192.168.7.9")));
        assert!(c.contains(ip("::ffff:192.168.7.9")));
        assert!(!c.contains(ip("192.169.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }

    #[test]
    fn cidr_single_addresses_and_v6() {
        let one = Cidr::parse(" 10.1.2.3 ").unwrap();
        assert_eq!(one, Cidr { addr: ip("10.1.2.3"), prefix: 32 });
        assert!(one.contains(ip("10.1.2.3")));
        assert!(!one.contains(ip("10.1.2.4")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::7")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")), "families never match");
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::1/129").is_err());
        assert_eq!(Cidr::parse("::1").unwrap().prefix, 128);
        // A mapped network is stored as IPv4, with an IPv4 prefix.
        assert_eq!(Cidr::parse("::ffff:10.0.0.0").unwrap(), Cidr { addr: ip("10.0.0.0"), prefix: 32 });
        assert_eq!(Cidr::parse("10.0.0.0/x").unwrap_err(), "\"10.0.0.0/x\": prefix length must be 0 to 32");
        assert_eq!(Cidr::parse("ten").unwrap_err(), "\"ten\" is not an IP address or network like 10.0.0.0/8");
    }

    #[test]
    fn canonical_unmaps_ipv4_mapped_addresses() {
        assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical(ip("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
        // IPv4-compatible (deprecated, `::a.b.c.d`) addresses stay IPv6.
        assert_eq!(canonical(ip("::1.2.3.4")), ip("::1.2.3.4"));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("shop.example"), "shop.example");
        assert_eq!(strip_port("shop.example:8080"), "shop.example");
        assert_eq!(strip_port("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("[fe80::1]:8443"), "fe80::1");
        // Bare IPv6 has no port to strip: the last colon is part of the address.
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("fe80::1"), "fe80::1");
        assert_eq!(strip_port("2001:db8::8080"), "2001:db8::8080");
        // Only digits make a port; an empty port is dropped too.
        assert_eq!(strip_port("shop.example:http"), "shop.example:http");
        assert_eq!(strip_port("shop.example:"), "shop.example");
        assert_eq!(strip_port("[::1"), "[::1");
    }
}

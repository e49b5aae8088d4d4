//! Where webhooks may go: `https://` endpoints on public addresses, checked after DNS
//! resolution, at registration and before every attempt (so a name that later resolves to
//! an internal address is refused then, and the connection goes to the address checked).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::Uri;

/// An endpoint address, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https` (or `http` when private addresses are allowed).
    pub tls: bool,
    /// The host name (or address) as written, for TLS and the `Host` header.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path and query sent in the request line.
    pub path_and_query: String,
}

/// How long a DNS resolution may take.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2_048;

/// Parses `url`: absolute, `https://` (or `http://` when `allow_private`), a host, no user
/// information or fragment.
pub fn parse(url: &str, allow_private: bool) -> Result<Target, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("`url` must be at most {MAX_URL_LEN} characters."));
    }
    if url.contains('#') {
        return Err("`url` must not have a fragment.".into());
    }
    let uri: Uri = url
        .parse()
        .map_err(|_| "`url` must be an absolute https:// URL.".to_owned())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if allow_private => false,
        Some("http") => return Err("`url` must use https://.".into()),
        _ => return Err("`url` must be an absolute https:// URL.".into()),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| "`url` must name a host.".to_owned())?;
    if authority.as_str().contains('@') {
        return Err("`url` must not carry a user name or password.".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("`url` must name a host.".into());
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path_and_query = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    Ok(Target {
        tls,
        host: host.to_owned(),
        port,
        path_and_query,
    })
}

/// Whether webhooks may be sent to `ip`: not loopback, private, shared (CGNAT), link-local
/// (which holds the cloud metadata address 169.254.169.254), unique-local (fd00:ec2::254),
/// unspecified, broadcast, multicast, documentation or reserved, also when written as an
/// IPv4-mapped IPv6 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            is_public_v6(v6)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    let first = seg[0];
    // Forms that carry an IPv4 address: NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the
    // address inside; the local-use NAT64 prefix (64:ff9b:1::/48) and Teredo (2001::/32)
    // are refused outright.
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if first == 0x64 && seg[1] == 0xff9b {
        return seg[2..6] == [0; 4] && is_public_v4(embedded(seg[6], seg[7]));
    }
    if first == 0x2002 {
        return is_public_v4(embedded(seg[1], seg[2]));
    }
    if first == 0x2001 && seg[1] == 0 {
        return false;
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, fd00:ec2::254 among them
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || ip.to_ipv4().is_some() && ip.segments()[..6] == [0; 6]) // IPv4-compatible
}

/// Resolves `target` and returns the addresses to connect to; an error when it does not
/// resolve, or when any address it resolves to is not public (unless `allow_private`).
pub async fn resolve(target: &Target, allow_private: bool) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| {
            format!(
                "{} did not resolve within {} s",
                target.host,
                RESOLVE_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{} does not resolve: {e}", target.host))?
        .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("{} does not resolve", target.host));
    }
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            // The address itself stays in the server's log: customers see these messages,
            // and they must not learn what internal names resolve to.
            tracing::debug!(host = %target.host, address = %bad.ip(), "webhook address refused");
            return Err(format!(
                "{} resolves to a loopback, private, link-local or metadata address, where \
                 webhooks are not sent",
                target.host
            ));
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for s in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::808:808",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(!is_public(ip(s)), "{s} is public");
        }
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(s)), "{s} is not public");
        }
    }

    #[test]
    fn urls_must_be_https_with_a_host() {
        let t = parse("https://hooks.example.com/a/b?c=1", false).unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "hooks.example.com".into(),
                port: 443,
                path_and_query: "/a/b?c=1".into()
            }
        );
        assert_eq!(parse("https://[::1]:8443", true).unwrap().host, "::1");
        assert!(parse("http://hooks.example.com/", false).is_err());
        assert!(parse("http://127.0.0.1:9/", true).is_ok());
        for bad in [
            "hooks.example.com",
            "ftp://x/",
            "https://user:pw@x.example/",
            "https://x.example/#frag",
            "/relative",
            "",
        ] {
            assert!(parse(bad, true).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn resolution_refuses_private_addresses_unless_allowed() {
        let t = parse("https://localhost:1/", false).unwrap();
        let err = resolve(&t, false).await.unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        assert!(
            !err.contains("127.0.0.1") && !err.contains("::1"),
            "no address told: {err}"
        );
        assert!(!resolve(&t, true).await.unwrap().is_empty());
        let t = parse("https://169.254.169.254/latest", false).unwrap();
        assert!(resolve(&t, false).await.is_err());
    }
}

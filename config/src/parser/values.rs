//! Checks and parsers for single values: prefixes, owners, interface
//! and group names, MAC addresses.

use super::*;

pub(super) fn parse_prefix4(s: &str, at: Location) -> Result<Ipv4Prefix> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid local prefix \"{s}\": expected A.B.C.D/len"),
        )
    };
    let (a, l) = s.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    if len > 32 || !l.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if len > 16 {
        return Err(err(
            at,
            format!("local prefix {s} is too long: the length must be at most 16"),
        ));
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    if u32::from(addr) & !mask != 0 {
        return Err(err(at, format!("local prefix {s} has host bits set")));
    }
    Ok(Ipv4Prefix { addr, len })
}

pub(super) fn parse_prefix6(s: &str, at: Location) -> Result<Ipv6Prefix> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid local inet6 prefix \"{s}\": expected ADDR/len"),
        )
    };
    let (a, l) = s.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv6Addr = a.parse().map_err(|_| bad())?;
    let len: u8 = l.parse().map_err(|_| bad())?;
    if len > 128 || !l.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if len > 64 {
        return Err(err(
            at,
            format!("local inet6 prefix {s} is too long: the length must be at most 64"),
        ));
    }
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    if u128::from(addr) & !mask != 0 {
        return Err(err(at, format!("local inet6 prefix {s} has host bits set")));
    }
    Ok(Ipv6Prefix { addr, len })
}

/// `user`, `user:group` or `:group`, with portable account names.
pub(super) fn parse_owner(s: &str, at: Location) -> Result<Owner> {
    let bad = || {
        err(
            at.clone(),
            format!("invalid owner \"{s}\": expected user, user:group or :group"),
        )
    };
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let user = (!u.is_empty()).then(|| u.to_string());
    let group = match g {
        Some("") => return Err(bad()),
        Some(g) => Some(g.to_string()),
        None => None,
    };
    if user.is_none() && group.is_none() {
        return Err(bad());
    }
    for (kind, n) in [("user", &user), ("group", &group)] {
        if let Some(n) = n {
            let ok = n.len() <= 32
                && !n.starts_with('-')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(err(
                    at.clone(),
                    format!("invalid {kind} name \"{n}\" in owner"),
                ));
            }
        }
    }
    Ok(Owner { user, group })
}

pub(super) fn check_ifname(s: &str, at: Location) -> Result<()> {
    if s.len() > MAX_IFNAME_LEN {
        return Err(err(
            at,
            format!("interface name \"{s}\" is longer than {MAX_IFNAME_LEN} characters"),
        ));
    }
    // The same rule priv applies when it creates the interface.
    if !vmd_proto::net::valid_ifname(s) {
        return Err(err(at, format!("invalid interface name \"{s}\"")));
    }
    Ok(())
}

/// Interface group names: like interface names, but a trailing digit
/// would make them look like an interface unit.
pub(super) fn check_group(s: &str, at: Location) -> Result<()> {
    if s.is_empty()
        || s.len() > MAX_IFNAME_LEN
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(err(at, format!("invalid group name \"{s}\"")));
    }
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        return Err(err(
            at,
            format!("group name \"{s}\" must not end with a digit"),
        ));
    }
    Ok(())
}

/// Six colon-separated groups of one or two hex digits; unicast only.
pub(super) fn parse_mac(s: &str, at: Location) -> Result<MacAddr> {
    let bad = || err(at.clone(), format!("invalid MAC address \"{s}\""));
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if out[0] & 1 != 0 {
        return Err(err(
            at,
            format!("MAC address \"{s}\" is a multicast address"),
        ));
    }
    Ok(MacAddr(out))
}

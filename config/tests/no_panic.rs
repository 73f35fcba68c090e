//! The parser must never panic, whatever it is fed.

use std::path::Path;

use proptest::prelude::*;

const WORDS: &[&str] = &[
    "vm",
    "switch",
    "include",
    "local",
    "prefix",
    "inet6",
    "socket",
    "owner",
    "agentx",
    "staggered",
    "start",
    "parallel",
    "delay",
    "enable",
    "disable",
    "memory",
    "vcpus",
    "boot",
    "device",
    "initrd",
    "cmdline",
    "cdrom",
    "disk",
    "format",
    "qcow2",
    "raw",
    "interface",
    "interfaces",
    "group",
    "locked",
    "lladdr",
    "rdomain",
    "up",
    "down",
    "allow",
    "instance",
    "{",
    "}",
    ";",
    ",",
    "=",
    "\n",
    "\\\n",
    "#",
    "\"",
    "\"x y\"",
    "$m",
    "$",
    "m",
    "1",
    "0",
    "512M",
    "1.5G",
    "99999999999999999999",
    "a:b",
    ":g",
    "fe:e1:ba:d0:00:01",
    "100.64.0.0/10",
    "fd00::/8",
    "/bsd",
    "web",
    "base",
    "uplink",
    "bridge0",
    "\\",
    "\u{0}",
    "é",
];

/// Includes resolve against a directory that does not exist.
fn parse(s: &str) {
    let _ = vmd_config::parse_str(s, "fuzz.conf", Path::new("/nonexistent-vmd-config-fuzz"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_tokens(idx in proptest::collection::vec(0..WORDS.len(), 0..80)) {
        let s: Vec<&str> = idx.iter().map(|&i| WORDS[i]).collect();
        parse(&s.join(" "));
    }

    #[test]
    fn mutated_valid_config(cut in 0usize..600, ins in 0..WORDS.len()) {
        let base = "m = \"1G\"\nswitch uplink { interface bridge0 }\n\
            vm base { memory $m; disk /a format qcow2\n interface { switch uplink; locked lladdr fe:e1:ba:d0:00:01 }\n\
            allow instance { memory, disk, instance } }\nvm base instance web { memory 2G }\n";
        let cut = cut.min(base.len());
        let cut = (0..=cut).rev().find(|&c| base.is_char_boundary(c)).unwrap_or(0);
        let s = format!("{}{}{}", &base[..cut], WORDS[ins], &base[cut..]);
        parse(&s);
    }
}

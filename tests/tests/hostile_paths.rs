//! Paths a hostile local user names, against the real daemon: priv opens
//! each path with the rights of whoever named it (a vmctl user's own, root
//! for vm.conf, an image's owner for the backing file it names), so a VM
//! owner gets no file they could not open themselves. Users are real
//! (made by the test), every case is one the daemon once got wrong.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vmd_e2e::{guest, users, Daemon};

const T: Duration = Duration::from_secs(60);
/// The hostile owner, and a second user whose files they may not read.
const OWNER: &str = "vmdtestpa";
const OTHER: &str = "vmdtestpb";
const SOCKET_GROUP: &str = "vmdtestpg";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Insists that `out` failed and that its message contains every needle.
fn refused(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "allowed, expected refusal: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not say {n:?}");
    }
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "refused: {}", stderr(out));
}

fn chown(path: &Path, user: &str) {
    let st = Command::new("chown")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success(), "chown {}", path.display());
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A file with `data`, owned by `user` with `mode`.
fn file_of(path: &Path, user: &str, mode: u32, data: &[u8]) -> PathBuf {
    std::fs::write(path, data).unwrap();
    chown(path, user);
    chmod(path, mode);
    path.to_path_buf()
}

/// A directory owned by `user`, open to everyone for reading.
fn dir_of(path: &Path, user: &str) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chown(path, user);
    chmod(path, 0o755);
    path.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A daemon whose socket the test users may use, with `vms` defined.
fn daemon(test: &str, vms: &str) -> Daemon {
    users::user(OWNER, &[SOCKET_GROUP]);
    users::user(OTHER, &[SOCKET_GROUP]);
    let dir = Daemon::dir_for(test);
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    let conf = dir.join("vm.conf");
    std::fs::write(&conf, format!("socket owner root:{SOCKET_GROUP}\n{vms}")).unwrap();
    Daemon::start_with(test, &["-f", s(&conf)])
}

/// vm.conf's block for a VM booting spin.elf (root-named), owned by
/// `owner`, with `extra` lines.
fn vm(name: &str, owner: &str, extra: &str) -> String {
    let spin = guest("spin.elf");
    format!(
        "vm {name} {{\n    boot \"{}\"\n    memory 32M\n    disable\n    owner {owner}\n{extra}}}\n",
        s(&spin)
    )
}

/// A template whose instances the hostile owner may make, changing the
/// boot image, initrd and disks: every path a user can name.
fn template() -> String {
    let spin = guest("spin.elf");
    format!(
        "vm tpl {{\n    boot \"{}\"\n    memory 32M\n    disable\n    allow instance {{ boot, disk, cdrom, owner {OWNER} }}\n}}\n",
        s(&spin)
    )
}

/// `vmctl start -t tpl ARGS NAME` as the hostile owner.
fn instance(d: &Daemon, name: &str, args: &[&str]) -> Output {
    let mut all = vec!["start", "-t", "tpl"];
    all.extend_from_slice(args);
    all.push(name);
    d.vmctl_as(OWNER, &all)
}

fn stop(d: &Daemon, name: &str) {
    d.ok(&["stop", "-f", "-w", name]);
}

fn assert_stopped(d: &Daemon, name: &str) {
    assert_eq!(
        d.status(name).map(|s| s.state),
        Some("stopped".to_string()),
        "{name} is not stopped after a refused start"
    );
}

/// The issue's findings for paths a user names in `vmctl start`: none of
/// them opens with root's rights any more; the user's own files still do.
/// The owner of a defined VM may name only its boot image (`-b`); an
/// instance maker names whatever `allow instance` lets them.
#[test]
fn a_users_paths_open_with_the_users_rights() {
    let d = daemon(
        "hpaths-owner",
        &format!("{}{}", vm("own", OWNER, ""), template()),
    );
    let udir = dir_of(&d.dir.join("owner-files"), OWNER);
    let secret = file_of(&d.dir.join("secret"), "root", 0o600, &[0x5a; 65536]);

    // `start -b GUEST --initrd /etc/shadow` printed /etc/shadow inside
    // the guest; the owner's `-b` too opens as the owner.
    let out = instance(&d, "i1", &["--initrd", "/etc/shadow"]);
    refused(&out, &["initrd", "/etc/shadow", "Permission denied"]);
    let out = d.vmctl_as(OWNER, &["start", "-b", s(&secret), "own"]);
    refused(&out, &["kernel", s(&secret), "Permission denied"]);
    assert_stopped(&d, "own");
    // -d raw:/root/file let the guest overwrite a root-only file.
    let raw_secret = format!("raw:{}", s(&secret));
    let out = instance(&d, "i2", &["-d", &raw_secret]);
    refused(&out, &["disk 0", s(&secret), "Permission denied"]);
    // -r too.
    let out = instance(&d, "i3", &["-r", s(&secret)]);
    refused(&out, &["cdrom", s(&secret), "Permission denied"]);
    // -d raw:/dev/loop0 read a root-only block device.
    let out = instance(&d, "i4", &["-d", "raw:/dev/loop0"]);
    refused(&out, &["/dev/loop0", "Permission denied"]);
    // A block device the user can open is still refused: only root names
    // block devices (a node of loop0's numbers, owned by the user).
    let node = udir.join("blk");
    let st = Command::new("mknod")
        .args([s(&node), "b", "7", "0"])
        .status()
        .expect("mknod");
    assert!(st.success());
    chown(&node, OWNER);
    chmod(&node, 0o600);
    let raw_node = format!("raw:{}", s(&node));
    let out = instance(&d, "i5", &["-d", &raw_node]);
    refused(&out, &["block device", "only root"]);
    // None of the refused instances is left behind.
    for name in ["i1", "i2", "i3", "i4", "i5"] {
        assert!(d.status(name).is_none(), "{name} left behind");
    }

    // The user's own files open: their kernel, initrd and disk.
    let kernel = file_of(
        &udir.join("kernel"),
        OWNER,
        0o600,
        &std::fs::read(guest("spin.elf")).unwrap(),
    );
    let initrd = file_of(&udir.join("initrd"), OWNER, 0o600, b"initrd");
    let disk = file_of(&udir.join("disk.img"), OWNER, 0o600, &[0; 65536]);
    let out = instance(
        &d,
        "mine",
        &["-b", s(&kernel), "--initrd", s(&initrd), "-d", s(&disk)],
    );
    succeeded(&out);
    d.wait_state("mine", "running", T);
    stop(&d, "mine");
    let out = d.vmctl_as(OWNER, &["start", "-b", s(&kernel), "own"]);
    succeeded(&out);
    d.wait_state("own", "running", T);
    stop(&d, "own");
}

/// Symlinks, `..` and hard links: the open follows them with the namer's
/// rights, so each reaches exactly what the user could reach.
#[test]
fn symlinks_dotdot_and_hard_links_reach_only_what_the_user_could() {
    let d = daemon("hpaths-links", &template());
    let udir = dir_of(&d.dir.join("owner-files"), OWNER);
    let rdir = d.dir.join("root-only");
    std::fs::create_dir_all(&rdir).unwrap();
    chmod(&rdir, 0o700);
    let secret = file_of(&rdir.join("secret.img"), "root", 0o644, &[0x5a; 65536]);
    let own = file_of(&udir.join("own.img"), OWNER, 0o600, &[0; 65536]);

    // A symlink the user made to a file in a directory they cannot search.
    let link = udir.join("link.img");
    symlink(&secret, &link).unwrap();
    let out = instance(&d, "lnk", &["-d", s(&link)]);
    refused(&out, &["Permission denied"]);
    // `..` out of their directory into the root-only one.
    let dotdot = format!("{}/../root-only/secret.img", s(&udir));
    let out = instance(&d, "lnk", &["-d", &dotdot]);
    refused(&out, &["Permission denied"]);
    // A hard link to a root-only file in the user's directory (root makes
    // it: fs.protected_hardlinks stops a user linking a file they cannot
    // write; with it off they could) opens as that file, so not for them.
    let hard_target = file_of(&d.dir.join("hard-secret.img"), "root", 0o600, &[1; 65536]);
    let hard = udir.join("hard.img");
    std::fs::hard_link(&hard_target, &hard).unwrap();
    let out = instance(&d, "lnk", &["-d", s(&hard)]);
    refused(&out, &["hard.img", "Permission denied"]);
    assert!(
        d.status("lnk").is_none(),
        "a refused instance is left behind"
    );

    // The same forms reaching the user's own file work: a symlink and a
    // path through `..`.
    let own_link = udir.join("own-link.img");
    symlink(&own, &own_link).unwrap();
    let sub = dir_of(&udir.join("sub"), OWNER);
    let own_dotdot = format!("{}/../own.img", s(&sub));
    let out = instance(&d, "lnk1", &["-d", s(&own_link)]);
    succeeded(&out);
    d.wait_state("lnk1", "running", T);
    stop(&d, "lnk1");
    let out = instance(&d, "lnk2", &["-d", &own_dotdot]);
    succeeded(&out);
    d.wait_state("lnk2", "running", T);
    stop(&d, "lnk2");
}

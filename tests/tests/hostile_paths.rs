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
    // A device or a FIFO the user may open is no image or initrd.
    let out = instance(&d, "i6", &["--initrd", "/dev/zero"]);
    refused(&out, &["/dev/zero", "not a regular file"]);
    let out = instance(&d, "i7", &["-d", "raw:/dev/null"]);
    refused(&out, &["/dev/null", "not a regular file"]);
    // None of the refused instances is left behind.
    for name in ["i1", "i2", "i3", "i4", "i5", "i6", "i7"] {
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

/// vmctl run as `user` (root when `None`), killed after 30 s so a daemon
/// that hangs fails the test instead of hanging it.
fn vmctl_bounded(d: &Daemon, user: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("30");
    if let Some(user) = user {
        cmd.args(["runuser", "-u", user, "--"]);
    }
    let out = cmd
        .arg(vmd_e2e::bin("vmctl"))
        .arg("-s")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("vmctl");
    assert_ne!(
        out.status.code(),
        Some(124),
        "vmctl {args:?} hung: vmd did not answer within 30 s\n{}",
        d.log()
    );
    out
}

/// `vmctl create ARGS` as `user`.
fn create_as(user: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(vmd_e2e::bin("vmctl"))
        .arg("create")
        .args(args)
        .output()
        .expect("vmctl create")
}

/// vm.conf's block for VM `name` booting spin.elf from root's definition
/// with `disk` (root names it), owned by `owner`.
fn vm_with_disk(name: &str, disk: &Path) -> String {
    vm(name, OWNER, &format!("    disk \"{}\"\n", s(disk)))
}

/// Backing files open with the rights of the owner of the image naming
/// them, whoever named the top image: an owner's overlay whose backing
/// file became a symlink to a root-only file gives root's vm.conf disk
/// nothing, a chain may cross owners where each could read its part, and
/// a FIFO as a backing file fails the start without hanging priv.
#[test]
fn backing_files_open_as_the_owner_of_the_image_naming_them() {
    users::user(OWNER, &[SOCKET_GROUP]);
    users::user(OTHER, &[SOCKET_GROUP]);
    let dir = Daemon::dir_for("hpaths-backing");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    let udir = dir_of(&dir.join("owner"), OWNER);
    let odir = dir_of(&dir.join("other"), OTHER);
    let secret = file_of(&dir.join("secret.img"), "root", 0o600, &[0x5a; 1 << 20]);

    // The owner's overlay over their own raw base; then the base becomes
    // a symlink to the root-only file.
    file_of(&udir.join("base.img"), OWNER, 0o644, &[0; 1 << 20]);
    let overlay = udir.join("overlay.qcow2");
    succeeded(&create_as(OWNER, &["-b", "base.img", s(&overlay)]));
    // Another overlay whose base will be a FIFO.
    file_of(&udir.join("fifo-base.img"), OWNER, 0o644, &[0; 1 << 20]);
    let fifo_top = udir.join("fifo.qcow2");
    succeeded(&create_as(OWNER, &["-b", "fifo-base.img", s(&fifo_top)]));
    // A chain across owners: the owner's top over the other user's
    // world-readable overlay over that user's private base.
    file_of(&odir.join("private.img"), OTHER, 0o644, &[0x33; 1 << 20]);
    let mid = odir.join("mid.qcow2");
    succeeded(&create_as(OTHER, &["-b", "private.img", s(&mid)]));
    chmod(&mid, 0o644);
    let cross = udir.join("cross.qcow2");
    succeeded(&create_as(OWNER, &["-b", s(&mid), s(&cross)]));
    chmod(&odir.join("private.img"), 0o600);
    // And one straight onto the other user's private base.
    file_of(&odir.join("private2.img"), OTHER, 0o644, &[0x44; 1 << 20]);
    let direct = udir.join("direct.qcow2");
    succeeded(&create_as(
        OWNER,
        &["-b", s(&odir.join("private2.img")), s(&direct)],
    ));
    chmod(&odir.join("private2.img"), 0o600);

    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "socket owner root:{SOCKET_GROUP}\n{}{}{}{}",
            vm_with_disk("symlinked", &overlay),
            vm_with_disk("fifo", &fifo_top),
            vm_with_disk("cross", &cross),
            vm_with_disk("direct", &direct),
        ),
    )
    .unwrap();
    let d = Daemon::start_with("hpaths-backing", &["-f", s(&conf)]);

    std::fs::remove_file(udir.join("base.img")).unwrap();
    symlink(&secret, udir.join("base.img")).unwrap();
    // Root starts its vm.conf VM: the backing file is the owner's to
    // name, and the owner cannot read the secret.
    let out = vmctl_bounded(&d, None, &["start", "symlinked"]);
    refused(&out, &["base.img", "Permission denied"]);
    assert_stopped(&d, "symlinked");
    let out = vmctl_bounded(&d, Some(OWNER), &["start", "symlinked"]);
    refused(&out, &["base.img", "Permission denied"]);

    // A FIFO as the backing file: refused at once, and priv still serves
    // root's next start.
    std::fs::remove_file(udir.join("fifo-base.img")).unwrap();
    let st = Command::new("runuser")
        .args(["-u", OWNER, "--", "mkfifo"])
        .arg(udir.join("fifo-base.img"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = vmctl_bounded(&d, None, &["start", "fifo"]);
    refused(&out, &["fifo-base.img", "not a regular file"]);
    let spin = guest("spin.elf");
    succeeded(&vmctl_bounded(
        &d,
        None,
        &["start", "-b", s(&spin), "-m", "32M", "after-fifo"],
    ));
    d.wait_state("after-fifo", "running", T);
    stop(&d, "after-fifo");

    // Across owners: the middle image is the other user's, so its base
    // opens as them; the owner's top naming the private base directly
    // opens it as the owner, who may not read it.
    succeeded(&vmctl_bounded(&d, None, &["start", "cross"]));
    d.wait_state("cross", "running", T);
    stop(&d, "cross");
    let out = vmctl_bounded(&d, None, &["start", "direct"]);
    refused(&out, &["private2.img", "Permission denied"]);
}

/// The CVE-2008-2004 case: a guest that writes a qcow2 header into its
/// raw disk, naming a backing file, reads its raw disk next time, not
/// that file. The header is written here as the guest would (a whole valid
/// qcow2 image over the raw disk's first sectors), and a real guest reads
/// the disk back.
#[test]
fn a_qcow2_header_in_a_raw_disk_changes_nothing() {
    let d = Daemon::start("hpaths-header");
    let secret = file_of(&d.dir.join("secret.img"), "root", 0o600, &[0x5a; 1 << 20]);
    let forged = d.dir.join("forged.qcow2");
    d.ok(&["create", "-b", s(&secret), s(&forged)]);
    let header = std::fs::read(&forged).unwrap();
    let mut raw = vec![0u8; 4 << 20];
    raw[..header.len()].copy_from_slice(&header);
    let disk = d.dir.join("guest.img");
    std::fs::write(&disk, &raw).unwrap();
    let blk = guest("blk.elf");
    d.ok(&[
        "start",
        "-b",
        s(&blk),
        "-m",
        "32M",
        "-d",
        s(&disk),
        "--cmdline",
        "read:0:1 read:4096:1",
        "g",
    ]);
    let console = d.console("g");
    console.wait_for("VMD-TEST blk done", T);
    let text = console.text();
    // Sector 0 is the forged header itself (qcow2 magic "QFI\xfb"), and
    // what lies past it is the raw disk's zeroes, not the secret's 0x5a.
    let first = vmd_e2e::line_after(&text, "read 0 1 status 0 ").expect("read line");
    assert!(
        first.contains("first 514649fb"),
        "the guest did not see its raw disk: {first}\n{text}"
    );
    let later = vmd_e2e::line_after(&text, "read 4096 1 status 0 ").expect("read line");
    assert!(
        later.contains("first 00000000000000000000000000000000"),
        "the guest read something else than its raw disk: {later}\n{text}"
    );
    d.wait_state("g", "stopped", T);
    // The name decides: the same bytes named with qcow2: are read as
    // qcow2, and root named it, so its backing file opens as root.
    let named = format!("qcow2:{}", s(&disk));
    d.ok(&[
        "start",
        "-b",
        s(&blk),
        "-m",
        "32M",
        "-d",
        &named,
        "--cmdline",
        "read:0:1",
        "q",
    ]);
    let console = d.console("q");
    console.wait_for("VMD-TEST blk done", T);
    let text = console.text();
    let first = vmd_e2e::line_after(&text, "read 0 1 status 0 ").expect("read line");
    assert!(
        first.contains("first 5a5a5a5a"),
        "qcow2: did not read the image as qcow2 over its backing file: {first}\n{text}"
    );
}

/// Backing files carry a shared lock, a writable top image an exclusive
/// one: no VM writes what another reads as its base, and each refusal
/// names the file.
#[test]
fn a_backing_file_in_use_is_never_opened_writable() {
    let d = Daemon::start("hpaths-locks");
    let base = d.dir.join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let top = d.dir.join("top.qcow2");
    d.ok(&["create", "-b", "base.img", s(&top)]);
    let spin = guest("spin.elf");
    let start = |name: &str, disk: &Path| {
        vmctl_bounded(
            &d,
            None,
            &["start", "-b", s(&spin), "-m", "32M", "-d", s(disk), name],
        )
    };
    succeeded(&start("reader", &top));
    d.wait_state("reader", "running", T);
    // The running VM's base, opened writable by another: refused.
    let out = start("writer", &base);
    refused(&out, &["locking", s(&base), "in use"]);
    // Its writable top image: refused too.
    let out = start("twin", &top);
    refused(&out, &["locking", s(&top)]);
    // Two overlays may share one base read-only.
    let top2 = d.dir.join("top2.qcow2");
    d.ok(&["create", "-b", "base.img", s(&top2)]);
    succeeded(&start("reader2", &top2));
    d.wait_state("reader2", "running", T);
    stop(&d, "reader");
    stop(&d, "reader2");
    // Free again: the base opens writable, and then is no one's base.
    succeeded(&start("writer", &base));
    d.wait_state("writer", "running", T);
    let out = start("reader", &top);
    refused(&out, &["locking", s(&base)]);
    stop(&d, "writer");
}

/// `vmctl create` runs as its user, without vmd: it makes and reads only
/// what that user could.
#[test]
fn vmctl_create_works_with_its_users_rights() {
    users::user(OWNER, &[SOCKET_GROUP]);
    let dir = Daemon::dir_for("hpaths-create");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    let rdir = dir.join("root-only");
    std::fs::create_dir_all(&rdir).unwrap();
    chmod(&rdir, 0o755);
    let secret = file_of(&dir.join("secret.img"), "root", 0o600, &[0x5a; 65536]);
    let out = create_as(OWNER, &["-s", "1M", s(&rdir.join("x.img"))]);
    refused(&out, &["x.img", "Permission denied"]);
    let udir = dir_of(&dir.join("owner"), OWNER);
    let out = create_as(OWNER, &["-b", s(&secret), s(&udir.join("o.qcow2"))]);
    refused(&out, &["secret.img", "Permission denied"]);
    let out = create_as(OWNER, &["-i", s(&secret), s(&udir.join("copy.img"))]);
    refused(&out, &["secret.img", "Permission denied"]);
    assert!(!udir.join("o.qcow2").exists() && !udir.join("copy.img").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rows of docs/SECURITY.md's "who names a path" table: the first
/// cell (who), the third (whose rights) and the fourth (block devices).
fn path_table() -> Vec<(String, String, String)> {
    let doc = std::fs::read_to_string(vmd_e2e::repo_root().join("docs/SECURITY.md")).unwrap();
    let section = doc
        .split("## Who names a path, whose rights open it")
        .nth(1)
        .expect("SECURITY.md has the 'Who names a path' section");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| who names the path"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c: Vec<&str> = l.split('|').map(str::trim).collect();
            (c[1].to_string(), c[3].to_string(), c[4].to_string())
        })
        .collect()
}

/// A loop device over a fresh file, detached when dropped.
struct Loop(String);

impl Loop {
    fn new(backing: &Path) -> Option<Loop> {
        std::fs::write(backing, vec![0u8; 1 << 20]).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", s(backing)])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// docs/SECURITY.md's table "who names a path, whose rights open it",
/// checked row by row against the daemon: for each namer, a path only root
/// may open and a block device, named that way, open or not as the row
/// says.
#[test]
fn the_who_names_a_path_table_holds() {
    let rows = path_table();
    let whos: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        whos,
        [
            "a vmctl user (not root)",
            "root, through vmctl",
            "vm.conf",
            "vmd itself",
            "a qcow2 image's header",
            "`vmctl create`",
        ],
        "the table's rows changed: update this test with them"
    );
    let dir = Daemon::dir_for("hpaths-table");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    users::user(OWNER, &[SOCKET_GROUP]);
    let udir = dir_of(&dir.join("owner"), OWNER);
    let private = file_of(&dir.join("private.img"), "root", 0o600, &[0x5a; 1 << 20]);
    // Root's overlay over the private file, and the owner's over the same.
    let root_overlay = dir.join("root-overlay.qcow2");
    let out = Command::new(vmd_e2e::bin("vmctl"))
        .args(["create", "-b", s(&private), s(&root_overlay)])
        .output()
        .unwrap();
    succeeded(&out);
    chmod(&private, 0o644);
    let user_overlay = udir.join("user-overlay.qcow2");
    succeeded(&create_as(OWNER, &["-b", s(&private), s(&user_overlay)]));
    chmod(&private, 0o600);
    let lo = Loop::new(&dir.join("loop.img"));
    let conf = dir.join("vm.conf");
    let kvm_group_member = Command::new("id")
        .args(["-nG", OWNER])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("kvm"));
    assert!(
        !kvm_group_member,
        "{OWNER} must not be able to open /dev/kvm"
    );
    let mut vms = format!(
        "socket owner root:{SOCKET_GROUP}\n{}{}{}{}",
        template(),
        vm_with_disk("conf-private", &private),
        vm_with_disk("root-overlay", &root_overlay),
        vm_with_disk("user-overlay", &user_overlay),
    );
    if let Some(lo) = &lo {
        vms.push_str(&vm_with_disk("conf-block", Path::new(&lo.0)));
    }
    std::fs::write(&conf, vms).unwrap();
    let d = Daemon::start_with("hpaths-table", &["-f", s(&conf)]);
    let spin = guest("spin.elf");
    let raw_private = format!("raw:{}", s(&private));

    // Opens (true) or is refused for want of rights (false).
    let expect = |out: Output, opens: bool, name: &str, what: &str| {
        if opens {
            succeeded(&out);
            d.wait_state(name, "running", T);
            stop(&d, name);
        } else {
            refused(&out, &[what]);
        }
    };
    let block_cell = |cell: &str| match cell {
        "refused" => false,
        "allowed" => true,
        other => panic!("block device cell {other:?}: expected refused or allowed"),
    };
    for (who, rights, block) in &rows {
        match who.as_str() {
            "a vmctl user (not root)" => {
                assert!(rights.contains("the user's uid, gid and supplementary groups"));
                let out = instance(&d, "t-user", &["-d", &raw_private]);
                expect(out, false, "t-user", "Permission denied");
                if let Some(lo) = &lo {
                    // Even one the user may open: a node they own.
                    let node = udir.join("lo-node");
                    let meta = std::fs::metadata(&lo.0).unwrap();
                    use std::os::unix::fs::MetadataExt;
                    let rdev = meta.rdev();
                    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
                    let st = Command::new("mknod")
                        .args([s(&node), "b", &major.to_string(), &minor.to_string()])
                        .status()
                        .unwrap();
                    assert!(st.success());
                    chown(&node, OWNER);
                    let raw_node = format!("raw:{}", s(&node));
                    let out = instance(&d, "t-user-blk", &["-d", &raw_node]);
                    expect(out, block_cell(block), "t-user-blk", "block device");
                }
            }
            "root, through vmctl" => {
                assert!(rights.starts_with("root"));
                let out = vmctl_bounded(
                    &d,
                    None,
                    &[
                        "start",
                        "-b",
                        s(&spin),
                        "-m",
                        "32M",
                        "-d",
                        &raw_private,
                        "t-root",
                    ],
                );
                expect(out, true, "t-root", "");
                if let Some(lo) = &lo {
                    let raw_lo = format!("raw:{}", lo.0);
                    let out = vmctl_bounded(
                        &d,
                        None,
                        &[
                            "start",
                            "-b",
                            s(&spin),
                            "-m",
                            "32M",
                            "-d",
                            &raw_lo,
                            "t-root-blk",
                        ],
                    );
                    expect(out, block_cell(block), "t-root-blk", "block device");
                }
            }
            "vm.conf" => {
                assert!(rights.starts_with("root"));
                // The owner starts it: vm.conf named the private file.
                let out = vmctl_bounded(&d, Some(OWNER), &["start", "conf-private"]);
                expect(out, true, "conf-private", "");
                match &lo {
                    Some(_) => {
                        let out = vmctl_bounded(&d, Some(OWNER), &["start", "conf-block"]);
                        expect(out, block_cell(block), "conf-block", "block device");
                    }
                    None => vmd_e2e::skipped(
                        "the table's block-device cells",
                        "losetup could not attach a loop device here",
                    ),
                }
            }
            "vmd itself" => {
                assert!(rights.starts_with("root"));
                // /dev/kvm is root:kvm 0660 and the owner is not in kvm,
                // yet their start gets it: vmd named it.
                let out = vmctl_bounded(&d, Some(OWNER), &["start", "conf-private"]);
                expect(out, true, "conf-private", "");
            }
            "a qcow2 image's header" => {
                assert!(rights.contains("the image file's owner"));
                // Root's image names the private file: root's rights.
                let out = vmctl_bounded(&d, None, &["start", "root-overlay"]);
                expect(out, true, "root-overlay", "");
                // The owner's image names it: the owner's, though root
                // (vm.conf) named the image and root starts it.
                let out = vmctl_bounded(&d, None, &["start", "user-overlay"]);
                expect(out, false, "user-overlay", "Permission denied");
            }
            "`vmctl create`" => {
                assert!(rights.contains("as the user running it"));
                let out = create_as(OWNER, &["-i", s(&private), s(&udir.join("c.img"))]);
                refused(&out, &["private.img", "Permission denied"]);
                let out = create_as(OWNER, &["-s", "1M", s(&udir.join("c.img"))]);
                succeeded(&out);
            }
            other => panic!("no check for row {other:?}"),
        }
    }
    // priv forks its opener children; that is safe only while it has one
    // thread.
    let privs: Vec<u32> = vmd_e2e::children_of(d.pid())
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"priv"))
        })
        .collect();
    assert_eq!(privs.len(), 1, "one priv process");
    assert_eq!(
        vmd_e2e::proc_status(privs[0], "Threads").as_deref(),
        Some("1"),
        "priv must stay single-threaded: it forks"
    );
}

/// Supplementary groups count, as they would for the user at a shell: a
/// client's (SO_PEERGROUPS) for what they name, an image owner's (from
/// /etc/group) for the backing file their image names.
#[test]
fn supplementary_groups_count_for_users_and_image_owners() {
    const MEMBER: &str = "vmdtestpc";
    const SHARED: &str = "vmdtestpshare";
    users::user(OWNER, &[SOCKET_GROUP]);
    users::user(MEMBER, &[SOCKET_GROUP, SHARED]);
    let dir = Daemon::dir_for("hpaths-groups");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    // Root's file, readable and writable by the shared group only.
    let shared = dir.join("shared.img");
    std::fs::write(&shared, vec![0x77u8; 1 << 20]).unwrap();
    let st = Command::new("chown")
        .arg(format!("root:{SHARED}"))
        .arg(&shared)
        .status()
        .unwrap();
    assert!(st.success());
    chmod(&shared, 0o660);
    // The member's overlay over it (made as the member: their group reads it).
    let mdir = dir_of(&dir.join("member"), MEMBER);
    let overlay = mdir.join("overlay.qcow2");
    succeeded(&create_as(MEMBER, &["-b", s(&shared), s(&overlay)]));
    let spin = guest("spin.elf");
    let conf = dir.join("vm.conf");
    std::fs::write(
        &conf,
        format!(
            "socket owner root:{SOCKET_GROUP}\n\
             vm tpl {{\n    boot \"{}\"\n    memory 32M\n    disable\n    allow instance {{ disk, owner :{SOCKET_GROUP} }}\n}}\n{}",
            s(&spin),
            vm_with_disk("member-overlay", &overlay),
        ),
    )
    .unwrap();
    let d = Daemon::start_with("hpaths-groups", &["-f", s(&conf)]);
    let start_as = |user: &str, name: &str| {
        vmctl_bounded(
            &d,
            Some(user),
            &["start", "-t", "tpl", "-d", s(&shared), name],
        )
    };
    // The member reads it through their supplementary group; the owner,
    // not in it, may not.
    succeeded(&start_as(MEMBER, "by-member"));
    d.wait_state("by-member", "running", T);
    stop(&d, "by-member");
    refused(
        &start_as(OWNER, "by-owner"),
        &["shared.img", "Permission denied"],
    );
    // Root's vm.conf names the member's overlay; its backing file opens as
    // the member, groups included.
    succeeded(&vmctl_bounded(&d, None, &["start", "member-overlay"]));
    d.wait_state("member-overlay", "running", T);
    stop(&d, "member-overlay");
}

/// A backing chain that loops, or runs deeper than OpenBSD's limit, fails
/// the start with an error naming the image, and priv serves the next one.
#[test]
fn looping_and_too_deep_backing_chains_fail_cleanly() {
    let d = Daemon::start("hpaths-chains");
    let img = |name: &str| d.dir.join(name);
    d.ok(&["create", "-s", "1M", s(&img("a.qcow2"))]);
    d.ok(&["create", "-b", "a.qcow2", s(&img("b.qcow2"))]);
    // a.qcow2 now names b.qcow2, which names a.qcow2.
    let st = Command::new("qemu-img")
        .args([
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "b.qcow2",
            s(&img("a.qcow2")),
        ])
        .status()
        .expect("qemu-img (qemu-utils)");
    assert!(st.success());
    let spin = guest("spin.elf");
    let start = |name: &str, disk: &Path| {
        vmctl_bounded(
            &d,
            None,
            &["start", "-b", s(&spin), "-m", "32M", "-d", s(disk), name],
        )
    };
    refused(&start("loop", &img("b.qcow2")), &["loop", "b.qcow2"]);
    // l0 <- l1 <- ... <- l6: six backing files below l6 (qemu-img makes
    // what vmctl create refuses to).
    d.ok(&["create", "-s", "1M", s(&img("l0.qcow2"))]);
    for i in 1..=6 {
        let base = format!("l{}.qcow2", i - 1);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base])
            .arg(img(&format!("l{i}.qcow2")))
            .status()
            .expect("qemu-img");
        assert!(st.success());
    }
    refused(
        &start("deep", &img("l6.qcow2")),
        &["more than 4 backing files"],
    );
    // Four are fine.
    succeeded(&start("four", &img("l4.qcow2")));
    d.wait_state("four", "running", T);
    stop(&d, "four");
}

/// A FUSE mount whose server never answers, detached (then its
/// connection closed, which ends every wait on it) when dropped.
struct SilentFuse {
    dir: PathBuf,
    _dev: std::fs::File,
}

impl SilentFuse {
    /// Mounts one at `dir` for `uid`/`gid`, or says why it cannot.
    fn mount(dir: &Path, uid: u32, gid: u32) -> Result<SilentFuse, String> {
        use std::os::fd::AsRawFd;
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| format!("/dev/fuse: {e}"))?;
        let opts = format!(
            "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other",
            dev.as_raw_fd()
        );
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, target, fstype, data) = (c("vmdtest"), c(s(dir)), c("fuse"), c(&opts));
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(format!("mount fuse: {}", std::io::Error::last_os_error()));
        }
        Ok(SilentFuse {
            dir: dir.to_path_buf(),
            _dev: dev,
        })
    }
}

impl Drop for SilentFuse {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(s(&self.dir)).unwrap();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A user can name a path on a file system that never answers (a FUSE
/// server of their own): the opener child waits, not priv, which gives up
/// after its timeout, kills the child, and serves root's next start.
#[test]
fn a_file_system_that_never_answers_does_not_hang_priv() {
    let d = daemon("hpaths-fuse", &template());
    let owner = users::user(OWNER, &[SOCKET_GROUP]);
    let mnt = dir_of(&d.dir.join("fuse"), OWNER);
    let fuse = match SilentFuse::mount(&mnt, owner.uid.as_raw(), owner.gid.as_raw()) {
        Ok(f) => f,
        Err(why) => return vmd_e2e::skipped("a_file_system_that_never_answers", &why),
    };
    let hung = format!("{}/disk.img", s(&mnt));
    let out = vmctl_bounded(&d, Some(OWNER), &["start", "-t", "tpl", "-d", &hung, "f1"]);
    refused(&out, &["disk.img", "no answer within 10 s"]);
    assert!(
        d.status("f1").is_none(),
        "the failed instance is left behind"
    );
    // priv is free again: root's start runs.
    let spin = guest("spin.elf");
    succeeded(&vmctl_bounded(
        &d,
        None,
        &["start", "-b", s(&spin), "-m", "32M", "after-fuse"],
    ));
    d.wait_state("after-fuse", "running", T);
    stop(&d, "after-fuse");
    drop(fuse);
}

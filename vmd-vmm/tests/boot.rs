//! Boots tiny guests assembled here (with `as`/`ld`) on the real KVM and
//! checks what they print and how they end. Needs root and /dev/kvm; says
//! so loudly and passes when either is missing.
//!
//! Extra, manual: `VMD_TEST_KERNEL=/path/vmlinux[,/path/bzImage]` with
//! `--ignored` boots a real Linux kernel until it prints `Linux version`.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    console, files, fork_vmm, guest, launch, launch_controlled, print_esi, print_str, wait_for_end,
    POWEROFF, PVH_NOTE,
};
use vmd_proto::vm::{ExitReason, VmmParams};
use vmd_proto::Msg;
use vmd_vmm::{DevOptions, Outcome, VmFiles};

/// [`common::kvm`], logging at debug level.
fn kvm() -> Option<std::os::fd::OwnedFd> {
    common::init_log(log::LevelFilter::Debug);
    common::kvm()
}

/// Verbose, named `test`.
fn params(vcpus: u32, cmdline: &str) -> VmmParams {
    VmmParams {
        verbose: true,
        ..common::params("test", vcpus, cmdline)
    }
}

struct Run {
    outcome: Outcome,
    output: String,
}

/// Boots `kernel` with `vcpus` and `cmdline`; fails the test after `limit`.
fn boot(
    kernel: &Path,
    vcpus: u32,
    cmdline: &str,
    opts: DevOptions,
    limit: Duration,
) -> Option<Run> {
    boot_with(kernel, None, vcpus, cmdline, opts, limit)
}

/// [`boot`] with an initrd.
fn boot_with(
    kernel: &Path,
    initrd: Option<&Path>,
    vcpus: u32,
    cmdline: &str,
    opts: DevOptions,
    limit: Duration,
) -> Option<Run> {
    let kvm = kvm()?;
    let con = console();
    let files = VmFiles {
        initrd: initrd.map(|i| fs::File::open(i).unwrap().into()),
        ..files(kvm, con.tty, kernel)
    };
    let p = VmmParams {
        has_initrd: initrd.is_some(),
        ..params(vcpus, cmdline)
    };
    let (outcome, output) = launch(p, files, con.out, opts).finish(limit);
    Some(Run { outcome, output })
}

const SECS_10: Duration = Duration::from_secs(10);

#[test]
fn pvh_guest_prints_and_powers_off() {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
  cmpl $0x336ec578, (%ebx)
  jne bad
  mov 24(%ebx), %esi     # cmdline_paddr
{cmdline}
{ok}
{POWEROFF}
bad:
{bad}
{POWEROFF}
",
        cmdline = print_esi("%esi"),
        ok = print_str("\nOK\n"),
        bad = print_str("BAD MAGIC\n"),
    );
    let elf = guest("pvh-ok", &src);
    let Some(r) = boot(&elf, 1, "hello pvh", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "hello pvh\nOK\n");
}

#[test]
fn linux64_entry_gets_zero_page_and_cmdline() {
    // No PVH note: the 64-bit Linux entry with RSI = boot_params.
    let src = format!(
        "
.text
.code64
.globl _start
_start:
  mov %rsi, %rbx
  movzbl 0x1e8(%rbx), %eax  # e820_entries
  add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $' ', %al
  out %al, %dx
  mov 0x228(%rbx), %esi     # hdr.cmd_line_ptr
{cmdline}
{ok}
{POWEROFF}
",
        cmdline = print_esi("%rsi"),
        ok = print_str("\nOK64\n"),
    );
    let elf = guest("linux64", &src);
    let Some(r) = boot(&elf, 1, "hello 64", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "4 hello 64\nOK64\n");
}

/// The guest finds the RSDP through the PVH start info, walks XSDT → MADT,
/// checks the MADT's checksum, counts its enabled processor entries, and
/// reads SCI_EN back from PM1a control (ACPI mode is always on).
#[test]
fn pvh_guest_finds_acpi_madt() {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
  mov 32(%ebx), %esi        # hvm_start_info.rsdp_paddr (below 4 GiB)
  cmpl $0x20445352, (%esi)  # 'RSD '
  jne bad
  cmpl $0x20525450, 4(%esi) # 'PTR '
  jne bad
  mov 24(%esi), %esi        # XsdtAddress
  cmpl $0x54445358, (%esi)  # 'XSDT'
  jne bad
  mov 4(%esi), %ecx
  add %esi, %ecx            # end of the XSDT
  lea 36(%esi), %edi        # its first entry
find:
  cmp %ecx, %edi
  jae bad
  mov (%edi), %esi
  cmpl $0x43495041, (%esi)  # 'APIC'
  je found
  add $8, %edi
  jmp find
found:
  mov 4(%esi), %ecx         # MADT length
  xor %ebx, %ebx
  xor %edi, %edi
sum:
  add (%esi,%edi), %bl
  inc %edi
  cmp %ecx, %edi
  jb sum
  test %bl, %bl
  jnz bad
  add %esi, %ecx            # end of the MADT
  lea 44(%esi), %edi        # first entry
walk:
  cmp %ecx, %edi
  jae counted
  cmpb $0, (%edi)           # processor local APIC
  jne next
  testb $1, 4(%edi)         # enabled
  jz next
  inc %ebx
next:
  movzbl 1(%edi), %eax
  test %eax, %eax
  jz bad
  add %eax, %edi
  jmp walk
counted:
  jne bad                   # overran the table's end
{cpus}
  mov %bl, %al
  add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $0x604, %dx
  in %dx, %ax
  test $1, %al              # SCI_EN
  jz bad
{ok}
{POWEROFF}
bad:
{bad}
{POWEROFF}
",
        cpus = print_str("ACPI CPUS "),
        ok = print_str(" SCI_EN\n"),
        bad = print_str("BAD\n"),
    );
    let elf = guest("acpi-madt", &src);
    let Some(r) = boot(&elf, 3, "", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "ACPI CPUS 3 SCI_EN\n");
}

/// The 64-bit Linux entry gets the RSDP in boot_params.acpi_rsdp_addr.
#[test]
fn linux64_entry_gets_acpi_rsdp_addr() {
    let src = format!(
        "
.text
.code64
.globl _start
_start:
  mov 0x70(%rsi), %rax      # boot_params.acpi_rsdp_addr
  mov $0x2052545020445352, %rcx  # 'RSD PTR '
  cmp %rcx, (%rax)
  jne bad
{ok}
{POWEROFF}
bad:
{bad}
{POWEROFF}
",
        ok = print_str("RSDP\n"),
        bad = print_str("BAD\n"),
    );
    let elf = guest("linux64-rsdp", &src);
    let Some(r) = boot(&elf, 1, "", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "RSDP\n");
}

#[test]
fn i8042_reset_reboots() {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{hi}
  mov $0xfe, %al
  out %al, $0x64
{POWEROFF}
",
        hi = print_str("reset\n")
    );
    let elf = guest("reset", &src);
    let Some(r) = boot(&elf, 1, "", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::Reboot));
    assert_eq!(r.output, "reset\n");
}

#[test]
fn ud2_without_idt_is_a_crash_with_registers() {
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
  ud2
{POWEROFF}
"
    );
    let elf = guest("ud2", &src);
    let Some(r) = boot(&elf, 1, "", DevOptions::default(), SECS_10) else {
        return;
    };
    let Outcome::Exited(ExitReason::GuestCrash(text)) = r.outcome else {
        panic!("expected a crash, got {:?}", r.outcome);
    };
    assert!(text.contains("rip=0x100000"), "{text}");
    assert!(text.contains("cr0="), "{text}");
}

#[test]
fn smp_guest_starts_its_aps() {
    // BSP: count CPUs from CPUID leaf 1, INIT/SIPI/SIPI everyone else to
    // the trampoline at 0x10000, wait for them to check in, print each
    // AP's APIC id (they print it themselves) and the count.
    let src = format!(
        "{PVH_NOTE}
.section .tramp, \"ax\"
.code16
ap_start:
  mov %cs, %ax
  mov %ax, %ds
  mov $1, %eax
  cpuid
  shr $24, %ebx
  mov %bl, %al
  add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  lock incw (counter - ap_start)
3: cli
  hlt
  jmp 3b
.p2align 4
counter: .word 0

.text
.code32
.globl _start
_start:
  mov $1, %eax
  cpuid
  shr $16, %ebx
  and $0xff, %ebx
  dec %ebx                    # APs expected
  movl $0x000c4500, 0xfee00300  # INIT to all but self
  mov $2000, %ecx
1: loop 1b
  movl $0x000c4610, 0xfee00300  # SIPI, vector 0x10
  mov $2000, %ecx
1: loop 1b
  movl $0x000c4610, 0xfee00300
  mov $3000000, %ecx
2: movzwl counter, %eax
  cmp %ebx, %eax
  je 4f
  loop 2b
4:
{aps}
  movzwl counter, %eax
  add $'0', %al
  out %al, %dx
  mov $'\\n', %al
  out %al, %dx
{POWEROFF}
",
        aps = print_str(" aps="),
    );
    let elf = guest("smp", &src);
    let Some(r) = boot(&elf, 4, "", DevOptions::default(), Duration::from_secs(30)) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert!(r.output.ends_with(" aps=3\n"), "{:?}", r.output);
    for id in ["1", "2", "3"] {
        assert!(r.output.contains(id), "AP {id} missing: {:?}", r.output);
    }
}

#[test]
fn not_a_kernel_is_a_vmm_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let junk = dir.join("junk-kernel");
    fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let Some(r) = boot(&junk, 1, "", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(
        r.outcome,
        Outcome::Exited(ExitReason::VmmError("kernel: not an ELF or bzImage".into()))
    );
}

/// The full protocol through `run()`, in a forked child (it drops
/// privileges for the whole process): VmmStart, VmmRunning, VmmExited.
#[test]
fn run_speaks_the_protocol() {
    let Some(kvm) = kvm() else { return };
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{hi}
{POWEROFF}
",
        hi = print_str("proto\n")
    );
    let elf = guest("proto", &src);
    let con = console();
    let (parent, pid) = fork_vmm(&kvm, &con.tty, &elf, params(1, ""));
    let f = parent.recv().unwrap();
    assert_eq!(f.msg, Msg::VmmRunning);
    // Its vCPU's KVM statistics fd, for the parent's metrics.
    let mut f = parent.recv().unwrap();
    if let Msg::VmmStats { first, count } = f.msg {
        assert_eq!((first, count, f.fds.len()), (0, 1, 1));
        f = parent.recv().unwrap();
    }
    assert_eq!(f.msg, Msg::VmmExited(ExitReason::PowerOff));
    let status = nix::sys::wait::waitpid(pid, None).unwrap();
    assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(&*con.out.lock().unwrap(), b"proto\n");
}

/// VmmTerminate stops a guest that would spin forever.
#[test]
fn terminate_stops_a_spinning_guest() {
    let Some(kvm) = kvm() else { return };
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{hi}
1: jmp 1b
",
        hi = print_str("spin\n")
    );
    let elf = guest("spin", &src);
    let con = console();
    let (parent, t) = launch_controlled(
        params(2, ""),
        files(kvm, con.tty, &elf),
        DevOptions::default(),
    );
    assert_eq!(parent.recv().unwrap().msg, Msg::VmmRunning);
    let start = Instant::now();
    wait_for_end(&con.out, "spin\n", SECS_10);
    parent.send(&Msg::VmmTerminate, 7, &[]).unwrap();
    let outcome = t.join().unwrap();
    assert_eq!(outcome, Outcome::Exited(ExitReason::Stopped));
    eprintln!("stopped in {:?}", start.elapsed());
}

/// Manual: boots the kernels in VMD_TEST_KERNEL (comma-separated) until
/// each prints `Linux version` (or VMD_TEST_WANT), then stops it.
/// VMD_TEST_VCPUS sets the vCPU count, VMD_TEST_IGNORE_PVH boots a PVH
/// vmlinux by its 64-bit entry.
#[test]
#[ignore]
fn linux_prints_its_version() {
    let Ok(list) = std::env::var("VMD_TEST_KERNEL") else {
        eprintln!("SKIPPED: set VMD_TEST_KERNEL=/path/vmlinux[,/path/bzImage]");
        return;
    };
    let want = std::env::var("VMD_TEST_WANT").unwrap_or_else(|_| "Linux version".into());
    let ignore_pvh = std::env::var("VMD_TEST_IGNORE_PVH").is_ok();
    let vcpus = std::env::var("VMD_TEST_VCPUS").map_or(1, |v| v.parse().unwrap());
    for kernel in list.split(',') {
        let Some(kvm) = kvm() else { return };
        let con = console();
        let p = VmmParams {
            memory: 512 << 20,
            ..params(vcpus, "console=ttyS0 earlyprintk=ttyS0 noxsave nosmap")
        };
        let opts = DevOptions { ignore_pvh };
        let (parent, t) = launch_controlled(p, files(kvm, con.tty, Path::new(kernel)), opts);
        assert_eq!(parent.recv().unwrap().msg, Msg::VmmRunning);
        let start = Instant::now();
        loop {
            let text = common::text(&con.out);
            if text.contains(&want) {
                eprintln!("{kernel}: {want:?} after {:?}", start.elapsed());
                break;
            }
            if t.is_finished() || start.elapsed() > Duration::from_secs(300) {
                panic!("{kernel}: no {want:?} after {:?}: {text}", start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        parent.send(&Msg::VmmTerminate, 7, &[]).unwrap();
        let outcome = t.join().unwrap();
        eprintln!("{kernel}: {outcome:?}\n{}", common::text(&con.out));
    }
}

/// The project's freestanding test guests (tests/guests, built here by
/// their own build.sh) on this VMM.
#[test]
fn project_test_guests() {
    if kvm().is_none() {
        return;
    }
    let script = common::project_guests_script();
    if !script.exists() {
        eprintln!("SKIPPED: {} not found", script.display());
        return;
    }
    let out = common::project_guests();

    let r = boot(
        &out.join("hello.elf"),
        2,
        "a b=c",
        DevOptions::default(),
        SECS_10,
    )
    .unwrap();
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert!(r.output.contains("cmdline: a b=c\n"), "{}", r.output);
    assert!(
        r.output.contains("cpus: mp-table=2 started=2\n"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("mem-total-ram: 65151 KiB\n"),
        "{}",
        r.output
    );
    assert!(r.output.ends_with("VMD-TEST hello done\n"), "{}", r.output);

    let r = boot(
        &out.join("reset.elf"),
        1,
        "",
        DevOptions::default(),
        SECS_10,
    )
    .unwrap();
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::Reboot));

    let r = boot(
        &out.join("badinsn.elf"),
        1,
        "",
        DevOptions::default(),
        SECS_10,
    )
    .unwrap();
    let Outcome::Exited(ExitReason::GuestCrash(text)) = r.outcome else {
        panic!("badinsn: expected a crash, got {:?}", r.outcome);
    };
    assert!(
        text.contains("KVM_EXIT_INTERNAL_ERROR") || text.contains("KVM_EXIT_SHUTDOWN"),
        "{text}"
    );
}

/// Host input typed on the console reaches the guest's UART, also when it
/// is more than the 64-byte receive FIFO holds at once.
#[test]
fn console_input_reaches_the_guest() {
    let Some(kvm) = kvm() else { return };
    // Echo every byte received on COM1 until a 'q', then power off.
    let src = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
{ready}
1: mov $0x3fd, %dx
  in %dx, %al
  test $1, %al
  jz 1b
  mov $0x3f8, %dx
  in %dx, %al
  out %al, %dx
  cmp $'q', %al
  jne 1b
{POWEROFF}
",
        ready = print_str("ready\n")
    );
    let elf = guest("echo", &src);
    let mut con = console();
    let run = launch(
        params(1, ""),
        files(kvm, con.tty, &elf),
        con.out.clone(),
        DevOptions::default(),
    );
    wait_for_end(&con.out, "ready\n", SECS_10);
    let text: Vec<u8> = (0..300u32)
        .map(|i| b'A' + (i % 26) as u8)
        .chain(*b"q")
        .collect();
    std::io::Write::write_all(&mut con.input, &text).unwrap();
    let outcome = run.done.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(outcome, Outcome::Exited(ExitReason::PowerOff));
    let got = con.out.lock().unwrap().clone();
    assert_eq!(&got[b"ready\n".len()..], &text[..], "echo differs");
}

/// The initrd reaches both boot paths: PVH module 0 and the zero page's
/// ramdisk fields; page-aligned, at the top of low RAM.
#[test]
fn initrd_is_handed_over() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let initrd = dir.join("initrd.txt");
    fs::write(&initrd, b"INITRD-OK\0").unwrap();
    // Prints the module's address, then its text.
    let pvh = format!(
        "{PVH_NOTE}
.text
.code32
.globl _start
_start:
  cmpl $1, 12(%ebx)        # nr_modules
  jne 8f
  mov 16(%ebx), %edi       # modlist_paddr
  mov (%edi), %esi         # module 0 paddr
  cmpl $10, 8(%edi)        # module 0 size
  jne 8f
  cmp $0x3fff000, %esi     # top page of 64 MiB
  jne 8f
{text}
{POWEROFF}
8:
{bad}
{POWEROFF}
",
        text = print_esi("%esi"),
        bad = print_str("BAD"),
    );
    let elf = guest("initrd-pvh", &pvh);
    let Some(r) = boot_with(&elf, Some(&initrd), 1, "", DevOptions::default(), SECS_10) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "INITRD-OK");

    let linux = format!(
        "
.text
.code64
.globl _start
_start:
  cmpl $10, 0x21c(%rsi)    # hdr.ramdisk_size
  jne 8f
  mov 0x218(%rsi), %esi    # hdr.ramdisk_image
  cmp $0x3fff000, %esi
  jne 8f
{text}
{POWEROFF}
8:
{bad}
{POWEROFF}
",
        text = print_esi("%rsi"),
        bad = print_str("BAD"),
    );
    let elf = guest("initrd-linux64", &linux);
    let r = boot_with(&elf, Some(&initrd), 1, "", DevOptions::default(), SECS_10).unwrap();
    assert_eq!(r.outcome, Outcome::Exited(ExitReason::PowerOff));
    assert_eq!(r.output, "INITRD-OK");
}

//! What a client other than root may change when it starts a VM. A VM's
//! definition is the ceiling (OpenBSD's `vm_register`/`vm_instance`
//! rules, or stricter): its owner may change only the boot image (`-b`,
//! which priv opens with the owner's own rights); an instance may change
//! only what its template's `allow instance` lists, at its creation and
//! at every later start; a `locked lladdr` is never dropped. Root may
//! change everything.

use vmd_config::AllowInstance;
use vmd_proto::vm::NicSpec;

use crate::vms::VmSpec;

/// One thing about a VM that a start request can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `-b`: the kernel or BIOS image.
    Kernel,
    /// `--initrd`.
    Initrd,
    /// `--cmdline`.
    Cmdline,
    /// `-B`, and vm.conf's `boot filename`.
    BootDevice,
    /// `-m`.
    Memory,
    /// `--vcpus`.
    Vcpus,
    /// `-d`.
    Disks,
    /// `-i`, `-L`, `-n`.
    Interfaces,
    /// `-r`.
    Cdrom,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Setting::Kernel => "boot",
            Setting::Initrd => "initrd",
            Setting::Cmdline => "cmdline",
            Setting::BootDevice => "boot device",
            Setting::Memory => "memory",
            Setting::Vcpus => "vcpus",
            Setting::Disks => "disk",
            Setting::Interfaces => "interface",
            Setting::Cdrom => "cdrom",
        })
    }
}

/// Why a start was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RightsError {
    #[error(
        "vm {vm}: its owner may change only the boot image (-b), not {setting}; ask root to change the definition"
    )]
    Owner { vm: String, setting: Setting },
    #[error("vm {template}: instances may not change {setting} (allow instance)")]
    Instance { template: String, setting: Setting },
}

/// Where an instance came from: its template's definition as it was when
/// the instance was made, and what the template lets instances change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub template: String,
    pub base: VmSpec,
    pub allow: AllowInstance,
}

/// What a non-root client may change, measured against `base`.
pub enum Ceiling<'a> {
    /// A vm.conf VM started by its owner.
    Owner { vm: &'a str, base: &'a VmSpec },
    /// An instance, made or started again by whoever may.
    Instance(&'a Origin),
}

impl Ceiling<'_> {
    fn base(&self) -> &VmSpec {
        match self {
            Ceiling::Owner { base, .. } => base,
            Ceiling::Instance(origin) => &origin.base,
        }
    }

    fn allows(&self, setting: Setting) -> bool {
        match self {
            Ceiling::Owner { .. } => setting == Setting::Kernel,
            Ceiling::Instance(Origin { allow, .. }) => match setting {
                Setting::Kernel | Setting::Initrd | Setting::Cmdline | Setting::BootDevice => {
                    allow.boot
                }
                Setting::Memory => allow.memory,
                Setting::Vcpus => allow.vcpus,
                Setting::Disks => allow.disk,
                Setting::Interfaces => allow.interface,
                Setting::Cdrom => allow.cdrom,
            },
        }
    }

    /// Refuses `new` when it changes anything the ceiling does not allow.
    pub fn check(&self, new: &VmSpec) -> Result<(), RightsError> {
        let Some(setting) = changes(self.base(), new)
            .into_iter()
            .find(|s| !self.allows(*s))
        else {
            return Ok(());
        };
        Err(match self {
            Ceiling::Owner { vm, .. } => RightsError::Owner {
                vm: vm.to_string(),
                setting,
            },
            Ceiling::Instance(origin) => RightsError::Instance {
                template: origin.template.clone(),
                setting,
            },
        })
    }

    /// A `locked lladdr` of the base (`locked` says whether a base
    /// interface is locked, its switch's lock included) stays on the
    /// interface that takes its place.
    pub fn keep_locks(&self, new: &mut VmSpec, locked: impl Fn(&NicSpec) -> bool) {
        for (nic, old) in new.nics.iter_mut().zip(&self.base().nics) {
            if locked(old) {
                nic.locked = true;
            }
        }
    }
}

/// Every setting in which `new` differs from `base`. The destructuring
/// is exhaustive so that a new field of `VmSpec` must be placed here.
pub fn changes(base: &VmSpec, new: &VmSpec) -> Vec<Setting> {
    let VmSpec {
        kernel,
        initrd,
        cmdline,
        memory,
        vcpus,
        disks,
        nics,
        cdrom,
        boot_device,
        boot_filename,
        // Not a setting: who named the paths, which opens them with their
        // own rights (never more than root's for the definition's).
        named_by: _,
    } = new;
    let mut out = Vec::new();
    if *kernel != base.kernel {
        out.push(Setting::Kernel);
    }
    // A new kernel drops the definition's initrd: that is part of `-b`.
    let initrd_dropped = initrd.is_none() && *kernel != base.kernel;
    if *initrd != base.initrd && !initrd_dropped {
        out.push(Setting::Initrd);
    }
    if *cmdline != base.cmdline {
        out.push(Setting::Cmdline);
    }
    if *boot_device != base.boot_device || *boot_filename != base.boot_filename {
        out.push(Setting::BootDevice);
    }
    if *memory != base.memory {
        out.push(Setting::Memory);
    }
    if *vcpus != base.vcpus {
        out.push(Setting::Vcpus);
    }
    if *disks != base.disks {
        out.push(Setting::Disks);
    }
    if *nics != base.nics {
        out.push(Setting::Interfaces);
    }
    if *cdrom != base.cdrom {
        out.push(Setting::Cdrom);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmd_proto::vm::{BootDevice, DiskSpec, StartRequest};

    fn base() -> VmSpec {
        let mut spec = VmSpec::from_request(
            &StartRequest {
                name: "t".into(),
                kernel: Some("/k".into()),
                initrd: Some("/i".into()),
                memory: Some(64 << 20),
                ..Default::default()
            },
            &vmd_proto::msg::Opener::root(),
        )
        .unwrap();
        spec.nics = vec![NicSpec {
            switch: Some("sw".into()),
            locked: true,
            up: true,
            ..Default::default()
        }];
        spec
    }

    fn over(req: StartRequest) -> VmSpec {
        VmSpec::merged(&base(), &req, &vmd_proto::msg::Opener::root()).unwrap()
    }

    fn req() -> StartRequest {
        StartRequest {
            name: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_flag_is_a_change() {
        let cases: Vec<(StartRequest, Setting)> = vec![
            (
                StartRequest {
                    kernel: Some("/k2".into()),
                    ..req()
                },
                Setting::Kernel,
            ),
            (
                StartRequest {
                    initrd: Some("/etc/shadow".into()),
                    ..req()
                },
                Setting::Initrd,
            ),
            (
                StartRequest {
                    cmdline: Some("init=/bin/sh".into()),
                    ..req()
                },
                Setting::Cmdline,
            ),
            (
                StartRequest {
                    boot_device: Some(BootDevice::Cdrom),
                    ..req()
                },
                Setting::BootDevice,
            ),
            (
                StartRequest {
                    memory: Some(128 << 20),
                    ..req()
                },
                Setting::Memory,
            ),
            (
                StartRequest {
                    vcpus: Some(2),
                    ..req()
                },
                Setting::Vcpus,
            ),
            (
                StartRequest {
                    disks: vec![DiskSpec {
                        path: "/dev/sda".into(),
                        format: None,
                        read_only: false,
                    }],
                    ..req()
                },
                Setting::Disks,
            ),
            (
                StartRequest {
                    nics: vec![NicSpec::default()],
                    ..req()
                },
                Setting::Interfaces,
            ),
            (
                StartRequest {
                    cdrom: Some("/x.iso".into()),
                    ..req()
                },
                Setting::Cdrom,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(changes(&base(), &over(r.clone())), vec![want], "{r:?}");
        }
        // The same value is no change (as OpenBSD compares).
        let same = StartRequest {
            memory: Some(64 << 20),
            ..req()
        };
        assert!(changes(&base(), &over(same)).is_empty());
    }

    #[test]
    fn owners_change_only_the_boot_image() {
        let b = base();
        let owner = Ceiling::Owner { vm: "t", base: &b };
        // -b alone drops the definition's initrd: allowed.
        let k = over(StartRequest {
            kernel: Some("/home/u/k".into()),
            ..req()
        });
        assert_eq!(k.initrd, None);
        owner.check(&k).unwrap();
        // -b with --initrd is an initrd change.
        let e = owner
            .check(&over(StartRequest {
                kernel: Some("/home/u/k".into()),
                initrd: Some("/etc/shadow".into()),
                ..req()
            }))
            .unwrap_err();
        assert_eq!(
            e,
            RightsError::Owner {
                vm: "t".into(),
                setting: Setting::Initrd
            }
        );
        let e = owner
            .check(&over(StartRequest {
                memory: Some(1 << 30),
                ..req()
            }))
            .unwrap_err();
        assert!(e.to_string().contains("not memory"), "{e}");
    }

    #[test]
    fn instances_change_what_allow_instance_lists() {
        let origin = Origin {
            template: "tpl".into(),
            base: base(),
            allow: AllowInstance {
                memory: true,
                interface: true,
                ..Default::default()
            },
        };
        let ceiling = Ceiling::Instance(&origin);
        ceiling
            .check(&over(StartRequest {
                memory: Some(32 << 20),
                ..req()
            }))
            .unwrap();
        let e = ceiling
            .check(&over(StartRequest {
                cdrom: Some("/x.iso".into()),
                ..req()
            }))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm tpl: instances may not change cdrom (allow instance)"
        );
        // A new interface in place of a locked one stays locked.
        let mut new = over(StartRequest {
            nics: vec![NicSpec {
                switch: Some("other".into()),
                up: true,
                ..Default::default()
            }],
            ..req()
        });
        ceiling.check(&new).unwrap();
        assert!(!new.nics[0].locked);
        ceiling.keep_locks(&mut new, |n| n.locked);
        assert!(new.nics[0].locked);
    }
}

//! How the VM ends: any thread (a vCPU, a device, the main loop) may ask
//! for the VM to stop and say why; the first reason given wins, and the
//! main loop is woken through an eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmd_proto::vm::ExitReason;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop for `reason` (ignored if a reason is already set).
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::debug!("exit requested: {reason}");
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // Can only fail if the counter would overflow: then it is set anyway.
        let _ = self.evt.write(1);
    }

    /// True once anyone asked the VM to stop: vCPUs leave their loops.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable when a reason was given.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

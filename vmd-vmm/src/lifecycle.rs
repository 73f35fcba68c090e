//! How the VM ends: any thread (a vCPU, a device, the main loop) may ask
//! for the VM to stop and say why; the first reason given wins, and the
//! main loop is woken through an eventfd.
//!
//! Pausing lives here too, since every vCPU already shares this signal:
//! the main loop sets the pause flag and kicks the vCPUs; each one, seeing
//! the flag, parks on a condvar (no spinning, no CPU time) and counts
//! itself, waking the main loop through the same eventfd so it can tell
//! when all of them are parked. Clearing the flag, or asking the VM to
//! stop, releases them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use vmd_proto::vm::ExitReason;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
    /// Fast check for the vCPU loops; the truth is `parking.paused`.
    pause_flag: AtomicBool,
    parking: Mutex<Parking>,
    unparked: Condvar,
}

#[derive(Debug, Default)]
struct Parking {
    paused: bool,
    /// vCPUs now waiting in [`ExitSignal::park`].
    parked: usize,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
            pause_flag: AtomicBool::new(false),
            parking: Mutex::new(Parking::default()),
            unparked: Condvar::new(),
        })
    }

    /// Asks the VM to stop for `reason` (ignored if a reason is already set).
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::debug!("exit requested: {reason}");
            *r = Some(reason);
        }
        drop(r);
        self.stopping.store(true, Ordering::SeqCst);
        // Parked vCPUs must leave too. Notifying under the parking lock,
        // after `stopping` is set, means no vCPU can check `stopping` and
        // then miss this wake-up.
        {
            let _p = self.lock_parking();
            self.unparked.notify_all();
        }
        self.wake();
    }

    /// Wakes the main loop without asking for anything; it re-checks the
    /// VM's state (a reason to stop, the parked vCPUs).
    pub fn wake(&self) {
        // Can only fail if the counter would overflow: then it is set anyway.
        let _ = self.evt.write(1);
    }

    fn lock_parking(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets or clears the pause flag. Setting it does not interrupt a
    /// running vCPU: kick them afterwards. Clearing it releases every
    /// parked vCPU.
    pub fn set_paused(&self, paused: bool) {
        let mut p = self.lock_parking();
        p.paused = paused;
        self.pause_flag.store(paused, Ordering::SeqCst);
        if !paused {
            self.unparked.notify_all();
        }
    }

    /// True while the VM should be paused: vCPUs call [`Self::park`].
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.load(Ordering::SeqCst)
    }

    /// How many vCPUs are parked right now.
    pub fn parked(&self) -> usize {
        self.lock_parking().parked
    }

    /// Called by a vCPU thread (outside KVM_RUN): blocks while the VM is
    /// paused and not stopping. Counts the caller as parked meanwhile and
    /// wakes the main loop so it can see everyone parked.
    pub fn park(&self) {
        let mut p = self.lock_parking();
        if !p.paused || self.is_stopping() {
            return;
        }
        p.parked += 1;
        self.wake();
        while p.paused && !self.is_stopping() {
            p = self.unparked.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.parked -= 1;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn wait_parked(s: &ExitSignal, n: usize) {
        for _ in 0..2000 {
            if s.parked() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{} parked, expected {n}", s.parked());
    }

    #[test]
    fn park_returns_at_once_when_running() {
        let s = ExitSignal::new().unwrap();
        s.park();
        assert_eq!(s.parked(), 0);
    }

    #[test]
    fn unpause_releases_parked_threads() {
        let s = Arc::new(ExitSignal::new().unwrap());
        s.set_paused(true);
        assert!(s.pause_requested());
        let t: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.park())
            })
            .collect();
        wait_parked(&s, 3);
        // Each parker woke the main loop.
        assert!(s.eventfd().read().unwrap() >= 1);
        s.set_paused(false);
        for t in t {
            t.join().unwrap();
        }
        assert_eq!(s.parked(), 0);
        assert!(!s.pause_requested());
    }

    #[test]
    fn stopping_releases_parked_threads() {
        let s = Arc::new(ExitSignal::new().unwrap());
        s.set_paused(true);
        let t = {
            let s = s.clone();
            std::thread::spawn(move || s.park())
        };
        wait_parked(&s, 1);
        s.request(ExitReason::Stopped);
        t.join().unwrap();
        assert_eq!(s.reason(), Some(ExitReason::Stopped));
        // Still paused, but a stopping VM does not park any more.
        s.park();
    }
}

//! The run loop: the main thread serves the parent's channel and the
//! console until the guest ends, and pauses and stops the vCPUs.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::vm::ExitReason;
use vmd_proto::{Channel, ChannelError, Msg};

use crate::devices::legacy::power::PWRBTN_STS;
use crate::vcpu::{self};

use super::build::Vm;
use super::{lock, Outcome};

/// How long to wait for vCPU threads to leave after a kick.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RunningVm {
    pub(super) vm: Vm,
    pub(super) threads: Vec<JoinHandle<()>>,
    pub(super) pause: PauseBook,
}

/// The main loop's side of pausing (the vCPUs' side is in `ExitSignal`).
#[derive(Default)]
pub(super) struct PauseBook {
    /// Paused, or pausing: the vCPUs were told to park.
    pub(super) paused: bool,
    /// Every live vCPU is parked (and the clock saved).
    pub(super) settled: bool,
    /// Peers waiting for `VmmPauseState { paused: true }`.
    pub(super) waiting: Vec<u32>,
    /// kvmclock as it was when the last vCPU parked.
    pub(super) clock: Option<kvm_clock_data>,
}

/// What woke the event loop.
struct Ready {
    exit: bool,
    room: bool,
    chan: bool,
    tty_in: bool,
    tty_gone: bool,
}

impl RunningVm {
    /// Serves the VM until it ends, then stops the vCPUs. With `chan`,
    /// obeys the parent's messages on it; without, runs until the guest
    /// ends (tests).
    pub fn event_loop(mut self, chan: Option<&Channel>) -> Outcome {
        let outcome = self.serve(chan);
        self.vm.exit.request(match &outcome {
            Outcome::Exited(r) => r.clone(),
            Outcome::ParentGone => ExitReason::Stopped,
        });
        self.stop_vcpus();
        outcome
    }

    /// Asks every vCPU thread to leave and waits (bounded) for them.
    pub(super) fn stop_vcpus(&mut self) {
        for t in &self.threads {
            vcpu::kick(t);
        }
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() > deadline {
                log::warn!("vCPU threads did not stop in {VCPU_STOP_TIMEOUT:?}; leaving them");
                // They may still touch guest memory: keep it mapped.
                std::mem::forget(self.vm.mem.clone());
                return;
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                vcpu::kick(t);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }

    fn serve(&mut self, chan: Option<&Channel>) -> Outcome {
        let mut tty_open = true;
        loop {
            if let Some(reason) = self.vm.exit.reason() {
                return Outcome::Exited(reason);
            }
            if let Some(c) = chan {
                self.settle_pause(c);
            }
            let mut want_tty = false;
            if tty_open {
                let mut room = lock(&self.vm.serial).room();
                if room == 0 {
                    // Full FIFO: ask to be woken when the guest reads, then
                    // look again in case it read in between.
                    self.vm.room.set_waiting();
                    room = lock(&self.vm.serial).room();
                }
                want_tty = room > 0;
            }
            let ready = match self.wait(chan, want_tty) {
                Ok(r) => r,
                Err(e) => return Outcome::Exited(ExitReason::VmmError(format!("poll: {e}"))),
            };
            if ready.exit {
                let _ = self.vm.exit.eventfd().read();
            }
            if ready.room {
                let _ = self.vm.room.eventfd().read();
            }
            if ready.chan {
                if let Some(c) = chan {
                    if let Some(outcome) = self.handle_message(c) {
                        return outcome;
                    }
                }
            }
            if ready.tty_in && !self.forward_input() {
                tty_open = false;
            }
            if ready.tty_gone && !ready.tty_in {
                log::info!("console tty hung up; guest input stops");
                tty_open = false;
            }
        }
    }

    fn wait(&self, chan: Option<&Channel>, want_tty: bool) -> nix::Result<Ready> {
        let fd = |raw| {
            // SAFETY: the eventfds live in `self.vm` for the whole call.
            unsafe { BorrowedFd::borrow_raw(raw) }
        };
        let mut fds = vec![
            PollFd::new(fd(self.vm.exit.eventfd().as_raw_fd()), PollFlags::POLLIN),
            PollFd::new(fd(self.vm.room.eventfd().as_raw_fd()), PollFlags::POLLIN),
        ];
        let chan_at = chan.map(|c| {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let tty_at = want_tty.then(|| {
            fds.push(PollFd::new(self.vm.tty.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let ev = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let any = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        Ok(Ready {
            exit: ev(0).contains(PollFlags::POLLIN),
            room: ev(1).contains(PollFlags::POLLIN),
            chan: chan_at.is_some_and(|i| ev(i).intersects(any)),
            tty_in: tty_at.is_some_and(|i| ev(i).contains(PollFlags::POLLIN)),
            tty_gone: tty_at
                .is_some_and(|i| ev(i).intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        })
    }

    /// One message from the parent; `Some` ends the loop.
    fn handle_message(&mut self, chan: &Channel) -> Option<Outcome> {
        match chan.recv() {
            Ok(frame) => match frame.msg {
                Msg::VmmTerminate => {
                    // Also when paused: the request wakes parked vCPUs.
                    log::info!("stopping on request");
                    self.vm.exit.request(ExitReason::Stopped);
                    None
                }
                Msg::VmmPowerButton => {
                    // A guest without ACPI never looks: the parent stops
                    // it after its grace period.
                    if lock(&self.vm.pm1a).raise(PWRBTN_STS) {
                        log::info!("power button pressed");
                    } else {
                        log::info!("power button pressed; the guest has not enabled it (yet)");
                    }
                    None
                }
                Msg::VmmPause => {
                    self.pause(frame.peer_id);
                    self.settle_pause(chan);
                    None
                }
                Msg::VmmUnpause => {
                    self.unpause();
                    // Whoever still waited for the pause (not all vCPUs
                    // parked yet) learns it did not happen.
                    for peer in std::mem::take(&mut self.pause.waiting) {
                        self.answer(chan, peer, false);
                    }
                    self.answer(chan, frame.peer_id, false);
                    None
                }
                Msg::SetVerbose { level } => {
                    log::set_max_level(vmd_proto::log_filter(level));
                    None
                }
                other => {
                    log::warn!("ignoring unexpected message type {}", other.type_code());
                    None
                }
            },
            Err(ChannelError::Closed) => {
                log::warn!("parent closed the channel; stopping the VM");
                Some(Outcome::ParentGone)
            }
            Err(e) if e.is_would_block() => None,
            Err(e) => {
                log::error!("channel: {e}");
                Some(Outcome::Exited(ExitReason::VmmError(format!(
                    "channel: {e}"
                ))))
            }
        }
    }

    /// Starts pausing (once) and queues `peer` for the answer, which
    /// [`Self::settle_pause`] sends when every vCPU is parked.
    fn pause(&mut self, peer: u32) {
        self.pause.waiting.push(peer);
        if self.pause.paused {
            return;
        }
        log::info!("pausing");
        self.pause.paused = true;
        self.pause.settled = false;
        self.vm.exit.set_paused(true);
        // Running vCPUs leave KVM_RUN (EINTR), and so do APs blocked in
        // it waiting for their SIPI; all of them then park.
        for t in &self.threads {
            vcpu::kick(t);
        }
    }

    /// Once every live vCPU is parked: saves the guest clock and answers
    /// whoever waits for the pause.
    fn settle_pause(&mut self, chan: &Channel) {
        if !self.pause.paused {
            return;
        }
        if !self.pause.settled {
            let live = self.threads.iter().filter(|t| !t.is_finished()).count();
            if self.vm.exit.parked() < live {
                return;
            }
            // With the vCPUs stopped, KVM's kvmclock still follows the
            // host's monotonic clock: on unpause the guest would see the
            // paused time pass at once. Save it now and put it back then
            // (as QEMU does for kvmclock). A guest reading the raw TSC
            // still sees the TSC advance across the pause: that would need
            // each vCPU's TSC offset moved back, which QEMU does not do
            // either.
            self.pause.clock = match self.vm._vm.get_clock() {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("KVM_GET_CLOCK: {e}; the guest clock runs on while paused");
                    None
                }
            };
            self.pause.settled = true;
            log::info!("paused ({live} vCPUs parked)");
        }
        for peer in std::mem::take(&mut self.pause.waiting) {
            self.answer(chan, peer, true);
        }
    }

    /// Releases the parked vCPUs, with the guest clock where it stopped.
    fn unpause(&mut self) {
        if !self.pause.paused {
            return;
        }
        if let Some(saved) = self.pause.clock.take() {
            // Only the value: flags such as KVM_CLOCK_REALTIME would ask
            // KVM to add the time that passed, older kernels refuse any.
            let clock = kvm_clock_data {
                clock: saved.clock,
                ..Default::default()
            };
            if let Err(e) = self.vm._vm.set_clock(&clock) {
                log::warn!("KVM_SET_CLOCK: {e}; the guest clock jumps ahead");
            }
        }
        self.pause.paused = false;
        self.pause.settled = false;
        self.vm.exit.set_paused(false);
        log::info!("unpaused");
    }

    fn answer(&self, chan: &Channel, peer: u32, paused: bool) {
        if let Err(e) = chan.send(&Msg::VmmPauseState { paused }, peer, &[]) {
            log::error!("cannot send the pause state to the parent: {e}");
        }
    }

    /// Moves what the FIFO can take from the tty into the UART. Returns
    /// false when the tty is gone.
    fn forward_input(&mut self) -> bool {
        let mut serial = lock(&self.vm.serial);
        let mut buf = [0u8; 64];
        let n = serial.room().min(buf.len());
        if n == 0 {
            return true;
        }
        match self.vm.tty.read(&mut buf[..n]) {
            Ok(0) => {
                log::info!("console tty closed; guest input stops");
                false
            }
            Ok(got) => {
                serial.enqueue(&buf[..got]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(e) => {
                // EIO: the pty master is closed.
                log::info!("console tty: {e}; guest input stops");
                false
            }
        }
    }
}

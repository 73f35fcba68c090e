//! COM1: vm-superio's 16550 UART wired to the console tty.
//!
//! Output goes to the tty without ever blocking the guest: the fd is made
//! non-blocking and bytes the tty cannot take right now are dropped (the
//! parent drains the pty master continuously). Input comes from the main
//! loop, which only reads the tty while the receive FIFO has room; when it
//! stops for a full FIFO it asks to be woken as soon as the guest reads.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("console tty: cannot make it non-blocking: {0}")]
    NonBlocking(nix::Error),
    #[error("console tty: cannot duplicate its fd: {0}")]
    Dup(io::Error),
    #[error("serial: cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

/// Raises the UART's interrupt: an eventfd registered as irqfd for its GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes the main loop when the guest reads and the loop is waiting for
/// room in the receive FIFO.
pub struct RoomNotifier {
    waiting: AtomicBool,
    evt: EventFd,
}

impl RoomNotifier {
    fn notify(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.evt.write(1);
        }
    }
    /// The main loop found the FIFO full and will wait on [`Self::eventfd`].
    pub fn set_waiting(&self) {
        self.waiting.store(true, Ordering::SeqCst);
    }
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Shared between the UART (inside a vCPU's lock) and the main loop.
#[derive(Clone)]
pub struct RoomEvents(pub Arc<RoomNotifier>);

impl SerialEvents for RoomEvents {
    fn buffer_read(&self) {
        self.0.notify();
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.0.notify();
    }
}

/// The tty as the UART's output: never blocks, never fails the guest.
pub struct TtyOut {
    tty: File,
    warned: bool,
}

impl Write for TtyOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.tty.write(buf) {
                // A tty taking nothing is as good as full.
                Ok(0) => return Ok(buf.len()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Nobody is draining the tty fast enough: drop the bytes.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(buf.len()),
                Err(e) => {
                    if !self.warned {
                        log::warn!("console output lost: {e}");
                        self.warned = true;
                    }
                    return Ok(buf.len());
                }
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type Uart = Serial<IrqTrigger, RoomEvents, TtyOut>;

/// COM1 on the port bus (8 registers at 0x3f8).
pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    /// A UART writing to `tty` (made non-blocking here). Returns the device,
    /// the eventfd to register as irqfd, and the room notifier.
    pub fn new(tty: &OwnedFd) -> Result<(SerialDevice, EventFd, Arc<RoomNotifier>), SerialError> {
        set_nonblocking(tty)?;
        let out = File::from(tty.try_clone().map_err(SerialError::Dup)?);
        let irq = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let room = Arc::new(RoomNotifier {
            waiting: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?,
        });
        let uart = Serial::with_events(
            IrqTrigger(irq.try_clone().map_err(SerialError::EventFd)?),
            RoomEvents(room.clone()),
            TtyOut {
                tty: out,
                warned: false,
            },
        );
        Ok((SerialDevice { uart }, irq, room))
    }

    /// Free space in the receive FIFO.
    pub fn room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.room() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input: {e:?}");
                0
            }
        }
    }
}

pub fn set_nonblocking(fd: &impl AsFd) -> Result<(), SerialError> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(SerialError::NonBlocking)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags)).map_err(SerialError::NonBlocking)?;
    Ok(())
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // UART registers are one byte wide; wider reads get the byte at
        // the start and zeros above it.
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, v) {
                log::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe() just returned these fds to us.
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn output_reaches_the_tty_and_never_blocks() {
        let (mut rd, wr) = pipe();
        let (mut dev, irq, _room) = SerialDevice::new(&wr).unwrap();
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        let mut buf = [0u8; 2];
        rd.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // Fill the pipe far beyond its capacity: must not block.
        for _ in 0..200_000 {
            dev.write(0, b"x");
        }
        drop(irq);
    }

    #[test]
    fn input_respects_the_fifo_and_wakes_the_reader() {
        let (_rd, wr) = pipe();
        let (mut dev, _irq, room) = SerialDevice::new(&wr).unwrap();
        let cap = dev.room();
        let big = vec![b'a'; cap + 10];
        assert_eq!(dev.enqueue(&big), cap);
        assert_eq!(dev.enqueue(b"more"), 0);
        room.set_waiting();
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [b'a']);
        assert_eq!(room.eventfd().read().unwrap(), 1);
        assert_eq!(dev.room(), 1);
    }
}

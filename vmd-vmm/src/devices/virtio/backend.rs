//! The device side of a virtio device: the data path. A device model
//! ([`VirtioDevice`]) runs here, in its own device process (virtio-blk,
//! virtio-net, virtio-scsi) or on a thread of the VM process (virtio-rng,
//! and every device in vmd-vmm's own tests), served the same way over the
//! same channel:
//!
//! 1. send `DevInfo` (type, features, queue sizes, configuration);
//! 2. answer each request of the VM process's transport with `DevAck`:
//!    `DevAttach` (guest RAM memfd, notify, call and error eventfds),
//!    `DevFeaturesOk`, `DevActivate` (the queues at DRIVER_OK), `DevReset`,
//!    `DevConfigWrite`;
//! 3. between requests, sleep in poll(2) on the queues' notify eventfds
//!    (KVM ioeventfds: a guest notify wakes this loop directly) and the
//!    model's input fd (a TAP), process the queues, and write a queue's call
//!    eventfd when it used buffers and the driver wants an interrupt; the
//!    VM process turns that into MSI-X or INTx. A driver that breaks the
//!    rules makes the device stop and write the error eventfd (the VM
//!    process sets DEVICE_NEEDS_RESET).
//!
//! The loop ends when the VM process closes the channel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmd_proto::vm::{QueueSetup, MAX_DEV_QUEUES};
use vmd_proto::{Channel, ChannelError, Msg};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::memory::{self, MemoryError};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("channel to the VM process: {0}")]
    Channel(#[from] ChannelError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("poll: {0}")]
    Poll(Errno),
}

/// What the VM process attached: guest RAM and the queue eventfds.
struct Attached {
    mem: GuestMemoryMmap,
    notify: Vec<EventFd>,
    calls: Vec<EventFd>,
    error: EventFd,
}

struct Backend {
    model: Box<dyn VirtioDevice>,
    attached: Option<Attached>,
    /// The queues while the driver runs (after DRIVER_OK, until reset).
    queues: Vec<Queue>,
    /// The driver broke the rules: nothing is served until a reset.
    failed: bool,
}

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the fd came with DevAttach as an eventfd and is ours alone;
    // a peer that sent another kind only breaks its own notifications
    // (reads and writes on it fail or mean nothing).
    unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }
}

impl Backend {
    fn active(&self) -> bool {
        !self.queues.is_empty() && !self.failed && self.attached.is_some()
    }

    /// Handles one request; returns the reply.
    fn request(&mut self, msg: Msg, fds: Vec<OwnedFd>) -> Result<Msg, BackendError> {
        match msg {
            Msg::DevAttach { regions, queues } => {
                let n = usize::from(queues);
                if self.attached.is_some() || n != self.model.queue_max_sizes().len() {
                    return Err(BackendError::Protocol(format!(
                        "DevAttach for {n} queues (device has {}, attached: {})",
                        self.model.queue_max_sizes().len(),
                        self.attached.is_some()
                    )));
                }
                let mut fds = fds.into_iter();
                let mut next = || {
                    fds.next()
                        .ok_or_else(|| BackendError::Protocol("DevAttach: fds missing".into()))
                };
                let memfd = std::fs::File::from(next()?);
                let mem = memory::map_shared(&memfd, &regions)?;
                let notify = (0..n)
                    .map(|_| next().map(eventfd))
                    .collect::<Result<_, _>>()?;
                let calls = (0..n)
                    .map(|_| next().map(eventfd))
                    .collect::<Result<_, _>>()?;
                let error = eventfd(next()?);
                self.attached = Some(Attached {
                    mem,
                    notify,
                    calls,
                    error,
                });
            }
            Msg::DevFeaturesOk { features } => self.model.features_ok(features),
            Msg::DevActivate { queues } => self.activate(&queues),
            Msg::DevReset => {
                self.queues.clear();
                self.failed = false;
                self.model.reset();
            }
            Msg::DevConfigWrite { offset, data } => self.model.write_config(offset, &data),
            other => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message type {}",
                    other.type_code()
                )))
            }
        }
        Ok(Msg::DevAck {
            config: self.model.config().to_vec(),
        })
    }

    /// DRIVER_OK: takes the queues as the driver set them up. Rings
    /// outside guest memory fail the device (the transport checked them
    /// too; this process trusts nothing it is told).
    fn activate(&mut self, setups: &[QueueSetup]) {
        let Some(att) = &self.attached else { return };
        let maxes = self.model.queue_max_sizes().to_vec();
        if setups.len() != maxes.len() {
            log::warn!(
                "activate: {} queues, device has {}",
                setups.len(),
                maxes.len()
            );
            self.fail();
            return;
        }
        let mut queues = Vec::with_capacity(maxes.len());
        for (i, (s, max)) in setups.iter().zip(maxes).enumerate() {
            let Ok(mut q) = Queue::new(max) else {
                self.fail();
                return;
            };
            if s.ready {
                let ok = q.try_set_size(s.size).is_ok();
                q.set_desc_table_address(Some(s.desc as u32), Some((s.desc >> 32) as u32));
                q.set_avail_ring_address(Some(s.avail as u32), Some((s.avail >> 32) as u32));
                q.set_used_ring_address(Some(s.used as u32), Some((s.used >> 32) as u32));
                q.set_ready(true);
                if !ok || !q.is_valid(&att.mem) {
                    log::warn!("queue {i}: bad size or rings outside guest memory");
                    self.fail();
                    return;
                }
            }
            queues.push(q);
        }
        self.queues = queues;
        self.failed = false;
    }

    fn fail(&mut self) {
        self.failed = true;
        if let Some(att) = &self.attached {
            let _ = att.error.write(1);
        }
    }

    /// Serves queue `index`, then any queue the device made work for (a
    /// reply to inject), a bounded number of times.
    fn process(&mut self, index: usize) {
        let mut next = Some(index);
        for _ in 0..=self.queues.len() {
            let Some(i) = next else { break };
            self.process_one(i);
            next = self.model.take_pending();
        }
    }

    fn process_one(&mut self, index: usize) {
        if !self.active() {
            return;
        }
        let Some(att) = &self.attached else { return };
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        match self.model.process_queue(index, queue, &att.mem) {
            Ok(0) => {}
            Ok(_) => {
                // VRING_AVAIL_F_NO_INTERRUPT: the driver polls.
                let flags: u16 = att
                    .mem
                    .read_obj(GuestAddress(queue.avail_ring()))
                    .unwrap_or(0);
                if flags & 1 == 0 {
                    let _ = att.calls[index].write(1);
                }
            }
            Err(e) => {
                log::warn!("queue {index}: {e}; device needs reset");
                self.fail();
            }
        }
    }

    /// The model's input queue, when its input fd should be polled now.
    fn input_armed(&self) -> Option<usize> {
        let (_, q) = self.model.input_fd()?;
        let ok = self.active()
            && self.queues.get(q).is_some_and(|q| q.ready())
            && self.model.input_wanted();
        ok.then_some(q)
    }
}

/// Serves `model` on `chan` until the VM process closes it.
pub fn serve(chan: &Channel, model: Box<dyn VirtioDevice>) -> Result<(), BackendError> {
    let sizes = model.queue_max_sizes().to_vec();
    if sizes.is_empty() || sizes.len() > MAX_DEV_QUEUES {
        return Err(BackendError::Protocol(format!("{} queues", sizes.len())));
    }
    chan.send(
        &Msg::DevInfo {
            device_type: model.device_type(),
            features: model.features(),
            queue_sizes: sizes,
            config: model.config().to_vec(),
        },
        0,
        &[],
    )?;
    let mut b = Backend {
        model,
        attached: None,
        queues: Vec::new(),
        failed: false,
    };
    let input = b.model.input_fd().map(|(fd, _)| fd);
    loop {
        let armed = b.input_armed();
        let notify_raw: Vec<i32> = b
            .attached
            .as_ref()
            .map(|a| a.notify.iter().map(|n| n.as_raw_fd()).collect())
            .unwrap_or_default();
        let borrow = |fd: i32| {
            // SAFETY: the fds live in `b` (eventfds, the model's TAP) and
            // are not closed during this poll.
            unsafe { BorrowedFd::borrow_raw(fd) }
        };
        let mut fds = vec![PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            notify_raw
                .iter()
                .map(|fd| PollFd::new(borrow(*fd), PollFlags::POLLIN)),
        );
        let input_at = match (input, armed) {
            (Some(fd), Some(_)) => {
                fds.push(PollFd::new(borrow(fd), PollFlags::POLLIN));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(BackendError::Poll(e)),
        }
        let rev = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
        let chan_ready = rev(&fds[0]).intersects(PollFlags::POLLIN | PollFlags::POLLHUP);
        let notified: Vec<usize> = (0..notify_raw.len())
            .filter(|i| rev(&fds[1 + i]).contains(PollFlags::POLLIN))
            .collect();
        let input_ready = input_at
            .is_some_and(|i| rev(&fds[i]).intersects(PollFlags::POLLIN | PollFlags::POLLERR));
        drop(fds);
        // Requests first: a reset must not see one more batch served.
        if chan_ready {
            let frame = match chan.recv() {
                Ok(f) => f,
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) if e.is_would_block() => continue,
                Err(e) => return Err(e.into()),
            };
            let reply = b.request(frame.msg, frame.fds)?;
            chan.send(&reply, 0, &[])?;
            continue;
        }
        for q in notified {
            if let Some(att) = &b.attached {
                let _ = att.notify[q].read();
            }
            b.process(q);
        }
        if let (true, Some(q)) = (input_ready, armed) {
            b.model.input_ready();
            b.process(q);
        }
    }
}

/// A backend on a thread of this process (virtio-rng; tests): the
/// transport's end of its channel, and the thread, which ends when that
/// end is dropped.
pub fn spawn_local(
    name: &str,
    model: Box<dyn VirtioDevice>,
) -> io::Result<(Channel, JoinHandle<()>)> {
    let (ours, theirs) = Channel::pair()?;
    let label = name.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("dev-{name}"))
        .spawn(move || {
            if let Err(e) = serve(&theirs, model) {
                log::error!("{label}: {e}");
            }
        })?;
    Ok((ours, thread))
}

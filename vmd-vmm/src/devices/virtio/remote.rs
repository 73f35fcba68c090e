//! The VM process's end of a device channel: the transport
//! ([`super::pci::VirtioPci`]) learns what the device is (`DevInfo`) and
//! sends it the driver's lifecycle as requests, each answered by `DevAck`
//! within [`REQUEST_TIMEOUT`]. Only the transport, under its lock, sends
//! requests, so requests and answers never interleave; the transport's
//! I/O thread only watches the channel for hang-up (the device died).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmd_proto::frame::Frame;
use vmd_proto::vm::MAX_DEV_QUEUES;
use vmd_proto::{Channel, ChannelError, Msg};

use super::pci::DEVICE_LEN;

/// How long a device process may take to describe itself (it opens and
/// checks its image first, in parallel with the VM's setup).
pub const INFO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a device may take to answer a lifecycle request; a vCPU waits
/// this long at most.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest queue a device may ask for (virtio's limit).
const MAX_QUEUE_SIZE: u16 = 32768;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("device process gone")]
    Gone,
    #[error("no answer from the device process in {0:?}")]
    Timeout(Duration),
    #[error("channel: {0}")]
    Channel(ChannelError),
    #[error("poll: {0}")]
    Poll(Errno),
    #[error("protocol: expected {expected}, got message type {got}")]
    Protocol { expected: &'static str, got: u16 },
    #[error("bad device description: {0}")]
    BadInfo(String),
}

impl From<ChannelError> for LinkError {
    fn from(e: ChannelError) -> LinkError {
        match e {
            ChannelError::Closed => LinkError::Gone,
            e => LinkError::Channel(e),
        }
    }
}

/// What a device said it is.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_type: u16,
    pub features: u64,
    pub queue_sizes: Vec<u16>,
    pub config: Vec<u8>,
}

/// A device at the other end of a channel.
pub struct DeviceLink {
    pub name: String,
    chan: Channel,
    pub info: DeviceInfo,
}

fn recv_within(chan: &Channel, timeout: Duration) -> Result<Frame, LinkError> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Err(LinkError::Timeout(timeout)),
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(LinkError::Poll(e)),
        }
    }
    Ok(chan.recv()?)
}

impl DeviceLink {
    /// Waits for the device's `DevInfo` and checks it.
    pub fn connect(name: &str, chan: Channel, timeout: Duration) -> Result<DeviceLink, LinkError> {
        let frame = recv_within(&chan, timeout)?;
        let Msg::DevInfo {
            device_type,
            features,
            queue_sizes,
            config,
        } = frame.msg
        else {
            return Err(LinkError::Protocol {
                expected: "DevInfo",
                got: frame.msg.type_code(),
            });
        };
        let info = DeviceInfo {
            device_type,
            features,
            queue_sizes,
            config,
        };
        check_info(&info)?;
        Ok(DeviceLink {
            name: name.to_string(),
            chan,
            info,
        })
    }

    /// Sends `msg` (with `fds`) and waits for its `DevAck`; returns the
    /// device configuration as it now reads.
    pub fn request(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<Vec<u8>, LinkError> {
        self.chan.send(msg, 0, fds)?;
        let frame = recv_within(&self.chan, REQUEST_TIMEOUT)?;
        match frame.msg {
            Msg::DevAck { config } if config.len() <= DEVICE_LEN as usize => Ok(config),
            Msg::DevAck { config } => Err(LinkError::BadInfo(format!(
                "configuration of {} bytes",
                config.len()
            ))),
            other => Err(LinkError::Protocol {
                expected: "DevAck",
                got: other.type_code(),
            }),
        }
    }

    /// The channel, for watching it hang up.
    pub fn chan_fd(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }
}

/// A device process is not trusted either: its description must fit the
/// transport.
fn check_info(info: &DeviceInfo) -> Result<(), LinkError> {
    let n = info.queue_sizes.len();
    if n == 0 || n > MAX_DEV_QUEUES {
        return Err(LinkError::BadInfo(format!("{n} queues")));
    }
    if let Some(s) = info
        .queue_sizes
        .iter()
        .find(|s| !s.is_power_of_two() || **s > MAX_QUEUE_SIZE)
    {
        return Err(LinkError::BadInfo(format!("queue size {s}")));
    }
    if info.config.len() > DEVICE_LEN as usize {
        return Err(LinkError::BadInfo(format!(
            "configuration of {} bytes",
            info.config.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sizes: &[u16], config: usize) -> DeviceInfo {
        DeviceInfo {
            device_type: 2,
            features: 0,
            queue_sizes: sizes.to_vec(),
            config: vec![0; config],
        }
    }

    #[test]
    fn hostile_descriptions_are_refused() {
        assert!(check_info(&info(&[256], 60)).is_ok());
        assert!(check_info(&info(&[], 0)).is_err());
        assert!(check_info(&info(&[100], 0)).is_err());
        assert!(check_info(&info(&[256; 9], 0)).is_err());
        assert!(check_info(&info(&[256], 0x801)).is_err());
    }

    #[test]
    fn silent_or_dead_devices_time_out_or_are_gone() {
        let (ours, theirs) = Channel::pair().unwrap();
        let t = Duration::from_millis(50);
        assert!(matches!(
            DeviceLink::connect("blk0", ours, t),
            Err(LinkError::Timeout(_))
        ));
        drop(theirs);
        let (ours, theirs) = Channel::pair().unwrap();
        drop(theirs);
        assert!(matches!(
            DeviceLink::connect("blk0", ours, t),
            Err(LinkError::Gone)
        ));
    }
}

//! virtio-scsi (virtio 1.2, 5.6) with one target and one LUN: a
//! read-only MMC CD-ROM over an ISO 9660 image (OpenBSD's vioscsi does
//! the same for `vmctl start -r`).
//!
//! Queues: 0 control (task management and asynchronous notification
//! requests are answered minimally), 1 event (buffers stay unused: no
//! hotplug, no media change), 2 the one request queue. The logical unit
//! is target 0, LUN 0; other targets answer BAD_TARGET, other LUNs of
//! target 0 LOGICAL UNIT NOT SUPPORTED. Commands: what SeaBIOS and Linux's
//! sr driver ask for (TEST UNIT READY, INQUIRY, REQUEST SENSE, REPORT
//! LUNS, READ CAPACITY(10), READ(10/12/16), MODE SENSE(6/10), GET
//! CONFIGURATION, READ TOC, GET EVENT STATUS NOTIFICATION, PREVENT ALLOW
//! MEDIUM REMOVAL, START STOP UNIT); writes get DATA PROTECT, the rest
//! ILLEGAL REQUEST. Every block range is checked against the image and
//! every buffer against guest memory; only a chain without room for the
//! response makes the transport ask for a device reset.

use std::fs::File;
use std::os::unix::fs::FileExt;
use virtio_bindings::virtio_scsi;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::{next_chain, ChainBuffers, VirtioDevice, VirtioError, TYPE_SCSI};

/// CD-ROM logical block size.
pub const BLOCK: u64 = 2048;
const CONTROL_QUEUE: usize = 0;
const REQUEST_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [64, 64, 128];
/// Bounce buffer: reads larger than this are served in pieces.
const BOUNCE: usize = 128 << 10;

/// Defaults of the configuration fields the driver may change (5.6.4).
pub const DEFAULT_SENSE_SIZE: u32 = 96;
pub const DEFAULT_CDB_SIZE: u32 = 32;
const CONFIG_LEN: usize = 36;
const CONFIG_SENSE_SIZE: usize = 20;
const CONFIG_CDB_SIZE: usize = 24;
/// Largest CDB we look at (READ(16) needs 16).
const CDB_MAX: usize = 32;

/// Request header before the CDB: lun[8], id, task_attr, prio, crn.
const REQ_HEADER: u64 = 19;
/// Response header before the sense bytes: sense_len, resid,
/// status_qualifier, status, response.
const RESP_HEADER: u64 = 12;

// Response codes (5.6.6.1).
pub const VIRTIO_SCSI_S_OK: u8 = virtio_scsi::VIRTIO_SCSI_S_OK as u8;
pub const VIRTIO_SCSI_S_BAD_TARGET: u8 = virtio_scsi::VIRTIO_SCSI_S_BAD_TARGET as u8;
pub const VIRTIO_SCSI_S_FAILURE: u8 = virtio_scsi::VIRTIO_SCSI_S_FAILURE as u8;
// Control request types (5.6.6.2).
const VIRTIO_SCSI_T_TMF: u32 = virtio_scsi::VIRTIO_SCSI_T_TMF;
const VIRTIO_SCSI_T_AN_QUERY: u32 = virtio_scsi::VIRTIO_SCSI_T_AN_QUERY;
const VIRTIO_SCSI_T_AN_SUBSCRIBE: u32 = virtio_scsi::VIRTIO_SCSI_T_AN_SUBSCRIBE;

// SCSI status.
pub const GOOD: u8 = 0;
pub const CHECK_CONDITION: u8 = 2;

// Operation codes.
pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const PREVENT_ALLOW: u8 = 0x1e;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const READ_TOC: u8 = 0x43;
pub const GET_CONFIGURATION: u8 = 0x46;
pub const GET_EVENT_STATUS: u8 = 0x4a;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const READ_16: u8 = 0x88;
pub const REPORT_LUNS: u8 = 0xa0;
pub const READ_12: u8 = 0xa8;
/// Commands that would change the medium: refused with DATA PROTECT.
const WRITES: [u8; 13] = [
    0x04, // FORMAT UNIT
    0x0a, // WRITE(6)
    0x2a, // WRITE(10)
    0x2e, // WRITE AND VERIFY(10)
    0x35, // SYNCHRONIZE CACHE(10)
    0x41, // WRITE SAME(10)
    0x42, // UNMAP
    0x8a, // WRITE(16)
    0x8e, // WRITE AND VERIFY(16)
    0x91, // SYNCHRONIZE CACHE(16)
    0x93, // WRITE SAME(16)
    0xaa, // WRITE(12)
    0xae, // WRITE AND VERIFY(12)
];

/// Fixed-format sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense(pub u8, pub u8, pub u8);
pub const NO_SENSE: Sense = Sense(0, 0, 0);
pub const INVALID_OPCODE: Sense = Sense(0x05, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = Sense(0x05, 0x21, 0x00);
pub const INVALID_FIELD: Sense = Sense(0x05, 0x24, 0x00);
pub const LUN_NOT_SUPPORTED: Sense = Sense(0x05, 0x25, 0x00);
pub const WRITE_PROTECTED: Sense = Sense(0x07, 0x27, 0x00);
pub const MEDIUM_NOT_PRESENT: Sense = Sense(0x02, 0x3a, 0x00);
pub const READ_ERROR: Sense = Sense(0x03, 0x11, 0x00);

/// How a command ended: GOOD with this many data-in bytes, or CHECK
/// CONDITION with sense data (and the data-in bytes sent before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Good(u64),
    Check(Sense, u64),
}

pub struct VirtioScsi {
    image: File,
    /// Whole 2048-byte blocks in the image.
    blocks: u64,
    config: [u8; CONFIG_LEN],
    bufs: ChainBuffers,
    bounce: Vec<u8>,
    /// A reply built for a command that returns small data.
    reply: Vec<u8>,
}

fn be16(b: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// An LBA as MMC's MSF address (minute, second, frame; 2 s of lead-in).
fn msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    let m = (f / (75 * 60)).min(255) as u8;
    [0, m, ((f / 75) % 60) as u8, (f % 75) as u8]
}

impl VirtioScsi {
    /// A CD-ROM over `image` (opened read-only) of `size` bytes.
    pub fn new(image: File, size: u64) -> VirtioScsi {
        if !size.is_multiple_of(BLOCK) {
            log::warn!(
                "cdrom: image size {size} is not a multiple of {BLOCK}; the tail is not read"
            );
        }
        let mut dev = VirtioScsi {
            image,
            blocks: size / BLOCK,
            config: [0; CONFIG_LEN],
            bufs: ChainBuffers::default(),
            bounce: vec![0; BOUNCE],
            reply: Vec::with_capacity(256),
        };
        dev.reset_config();
        dev
    }

    fn reset_config(&mut self) {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &1u32.to_le_bytes()); // num_queues
        put(4, &u32::from(QUEUE_SIZES[REQUEST_QUEUE] - 2).to_le_bytes()); // seg_max
        put(8, &0xffffu32.to_le_bytes()); // max_sectors
        put(12, &u32::from(QUEUE_SIZES[REQUEST_QUEUE]).to_le_bytes()); // cmd_per_lun
        put(16, &16u32.to_le_bytes()); // event_info_size
        put(CONFIG_SENSE_SIZE, &DEFAULT_SENSE_SIZE.to_le_bytes());
        put(CONFIG_CDB_SIZE, &DEFAULT_CDB_SIZE.to_le_bytes());
        // max_channel, max_target and max_lun stay 0: one LUN.
        self.config = c;
    }

    fn config_u32(&self, at: usize) -> u64 {
        let c = &self.config[at..at + 4];
        u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// Serves one request-queue chain; returns the bytes written.
    fn request(&mut self, mem: &GuestMemoryMmap) -> Result<u64, ()> {
        let sense_size = self.config_u32(CONFIG_SENSE_SIZE);
        let cdb_size = self.config_u32(CONFIG_CDB_SIZE);
        let writable = self.bufs.writable_len;
        if writable < RESP_HEADER {
            return Err(());
        }
        let resp_len = (RESP_HEADER + sense_size).min(writable);
        let data_room = writable - resp_len;
        let mut head = [0u8; REQ_HEADER as usize];
        let mut cdb = [0u8; CDB_MAX];
        let cdb_len = (self.bufs.readable_len.saturating_sub(REQ_HEADER))
            .min(cdb_size)
            .min(CDB_MAX as u64) as usize;
        let readable_ok = self.bufs.readable_len >= REQ_HEADER + 6
            && self.bufs.read(mem, 0, &mut head).is_ok()
            && self.bufs.read(mem, REQ_HEADER, &mut cdb[..cdb_len]).is_ok();
        let mut resp = [0u8; RESP_HEADER as usize];
        let mut sense_bytes = [0u8; 18];
        let (written, response) = if !readable_ok {
            resp[11] = VIRTIO_SCSI_S_FAILURE;
            (0, VIRTIO_SCSI_S_FAILURE)
        } else if head[0] != 1 || head[1] != 0 {
            // Only target 0 exists.
            (0, VIRTIO_SCSI_S_BAD_TARGET)
        } else {
            let lun = (u16::from(head[2] & 0x3f) << 8) | u16::from(head[3]);
            let done = self.command(mem, lun, &cdb, resp_len, data_room);
            let (status, written, sense) = match done {
                Done::Good(n) => (GOOD, n, None),
                Done::Check(s, n) => (CHECK_CONDITION, n, Some(s)),
            };
            resp[10] = status;
            if let Some(Sense(key, asc, ascq)) = sense {
                sense_bytes[0] = 0x70;
                sense_bytes[2] = key;
                sense_bytes[7] = 10;
                sense_bytes[12] = asc;
                sense_bytes[13] = ascq;
                let n = (sense_bytes.len() as u64).min(sense_size) as u32;
                resp[0..4].copy_from_slice(&n.to_le_bytes());
            }
            (written, VIRTIO_SCSI_S_OK)
        };
        resp[11] = response;
        let resid = data_room.saturating_sub(written).min(u64::from(u32::MAX)) as u32;
        resp[4..8].copy_from_slice(&resid.to_le_bytes());
        let sense_len = u64::from(u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]));
        let sense_fits = sense_len.min(resp_len - RESP_HEADER) as usize;
        if self.bufs.write(mem, 0, &resp).is_err()
            || self
                .bufs
                .write(mem, RESP_HEADER, &sense_bytes[..sense_fits])
                .is_err()
        {
            return Err(());
        }
        Ok(resp_len + written)
    }

    /// Runs `cdb` on LUN `lun`, data-in going after `skip` writable
    /// bytes, at most `room` of them.
    fn command(
        &mut self,
        mem: &GuestMemoryMmap,
        lun: u16,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        let op = cdb[0];
        if lun != 0 {
            return match op {
                INQUIRY => {
                    self.reply.clear();
                    // Peripheral qualifier 3: no logical unit here.
                    self.reply.extend_from_slice(&[0x7f, 0, 5, 2, 31]);
                    self.reply.resize(36, 0);
                    self.send_reply(mem, skip, room, be16(&cdb[3..5]))
                }
                REPORT_LUNS => self.report_luns(mem, cdb, skip, room),
                REQUEST_SENSE => {
                    self.sense_reply(LUN_NOT_SUPPORTED);
                    self.send_reply(mem, skip, room, u64::from(cdb[4]))
                }
                _ => Done::Check(LUN_NOT_SUPPORTED, 0),
            };
        }
        match op {
            TEST_UNIT_READY | PREVENT_ALLOW | START_STOP_UNIT => Done::Good(0),
            REQUEST_SENSE => {
                self.sense_reply(NO_SENSE);
                self.send_reply(mem, skip, room, u64::from(cdb[4]))
            }
            INQUIRY => self.inquiry(mem, cdb, skip, room),
            REPORT_LUNS => self.report_luns(mem, cdb, skip, room),
            READ_CAPACITY_10 => {
                if self.blocks == 0 {
                    return Done::Check(MEDIUM_NOT_PRESENT, 0);
                }
                let last = (self.blocks - 1).min(u64::from(u32::MAX)) as u32;
                self.reply.clear();
                self.reply.extend_from_slice(&last.to_be_bytes());
                self.reply.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                self.send_reply(mem, skip, room, 8)
            }
            READ_10 => self.read(mem, be32(&cdb[2..6]), be16(&cdb[7..9]), skip, room),
            READ_12 => self.read(mem, be32(&cdb[2..6]), be32(&cdb[6..10]), skip, room),
            READ_16 => self.read(mem, be64(&cdb[2..10]), be32(&cdb[10..14]), skip, room),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(mem, cdb, skip, room),
            READ_TOC => self.read_toc(mem, cdb, skip, room),
            GET_CONFIGURATION => self.get_configuration(mem, cdb, skip, room),
            GET_EVENT_STATUS => self.event_status(mem, cdb, skip, room),
            op if WRITES.contains(&op) => Done::Check(WRITE_PROTECTED, 0),
            _ => Done::Check(INVALID_OPCODE, 0),
        }
    }

    /// Sends the first `alloc` bytes of `self.reply` (what fits in the
    /// buffers).
    fn send_reply(&self, mem: &GuestMemoryMmap, skip: u64, room: u64, alloc: u64) -> Done {
        let n = (self.reply.len() as u64).min(alloc).min(room) as usize;
        match self.bufs.write(mem, skip, &self.reply[..n]) {
            Ok(()) => Done::Good(n as u64),
            Err(_) => Done::Check(INVALID_FIELD, 0),
        }
    }

    fn sense_reply(&mut self, Sense(key, asc, ascq): Sense) {
        self.reply.clear();
        self.reply.resize(18, 0);
        self.reply[0] = 0x70;
        self.reply[2] = key;
        self.reply[7] = 10;
        self.reply[12] = asc;
        self.reply[13] = ascq;
    }

    fn inquiry(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        let alloc = be16(&cdb[3..5]);
        self.reply.clear();
        if cdb[1] & 1 != 0 {
            // Vital product data: only the list of pages.
            if cdb[2] != 0 {
                return Done::Check(INVALID_FIELD, 0);
            }
            self.reply
                .extend_from_slice(&[0x05, 0x00, 0x00, 0x01, 0x00]);
            return self.send_reply(mem, skip, room, alloc);
        }
        if cdb[2] != 0 {
            return Done::Check(INVALID_FIELD, 0);
        }
        // CD-ROM, removable, SPC-3, response format 2.
        self.reply
            .extend_from_slice(&[0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0]);
        self.reply.extend_from_slice(b"VMD     ");
        self.reply.extend_from_slice(b"Virtual CD-ROM  ");
        self.reply.extend_from_slice(b"1.0 ");
        self.send_reply(mem, skip, room, alloc)
    }

    fn report_luns(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        self.reply.clear();
        self.reply.extend_from_slice(&8u32.to_be_bytes());
        self.reply.resize(16, 0); // reserved, then LUN 0
        self.send_reply(mem, skip, room, be32(&cdb[6..10]))
    }

    fn read(&mut self, mem: &GuestMemoryMmap, lba: u64, count: u64, skip: u64, room: u64) -> Done {
        if self.blocks == 0 {
            return Done::Check(MEDIUM_NOT_PRESENT, 0);
        }
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks => {}
            _ => return Done::Check(LBA_OUT_OF_RANGE, 0),
        }
        // A data-in buffer shorter than the transfer gets what fits.
        let len = (count * BLOCK).min(room);
        let off = lba * BLOCK;
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(self.bounce.len());
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.image.read_exact_at(buf, off + done) {
                log::warn!("cdrom: read at {}: {e}", off + done);
                return Done::Check(READ_ERROR, done);
            }
            if self.bufs.write(mem, skip + done, buf).is_err() {
                return Done::Check(INVALID_FIELD, done);
            }
            done += n as u64;
        }
        Done::Good(done)
    }

    fn mode_sense(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        let ten = cdb[0] == MODE_SENSE_10;
        let page = cdb[2] & 0x3f;
        let alloc = if ten {
            be16(&cdb[7..9])
        } else {
            u64::from(cdb[4])
        };
        self.reply.clear();
        let header = if ten { 8 } else { 4 };
        self.reply.resize(header, 0);
        if page == 0x2a || page == 0x3f {
            // MM capabilities: reads CD-ROM media, tray, no writing.
            let mut p = [0u8; 22];
            p[0] = 0x2a;
            p[1] = 20;
            p[6] = 0x29; // lock, eject, tray loading mechanism
            self.reply.extend_from_slice(&p);
        } else if page != 0 {
            return Done::Check(INVALID_FIELD, 0);
        }
        let len = self.reply.len();
        if ten {
            self.reply[0..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
        } else {
            self.reply[0] = (len - 1) as u8;
        }
        self.send_reply(mem, skip, room, alloc)
    }

    fn read_toc(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        if self.blocks == 0 {
            return Done::Check(MEDIUM_NOT_PRESENT, 0);
        }
        let msf_form = cdb[1] & 0x02 != 0;
        let format = match cdb[2] & 0x0f {
            0 => cdb[9] >> 6, // the older place of the format
            f => f,
        };
        let alloc = be16(&cdb[7..9]);
        let addr = |lba: u64| {
            if msf_form {
                msf(lba)
            } else {
                (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
            }
        };
        self.reply.clear();
        match format {
            0 => {
                let track = cdb[6];
                if track > 1 && track != 0xaa {
                    return Done::Check(INVALID_FIELD, 0);
                }
                self.reply.extend_from_slice(&[0, 0, 1, 1]);
                if track <= 1 {
                    // Track 1: data, from LBA 0.
                    self.reply.extend_from_slice(&[0, 0x14, 1, 0]);
                    self.reply.extend_from_slice(&addr(0));
                }
                // The lead-out.
                self.reply.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                self.reply.extend_from_slice(&addr(self.blocks));
            }
            1 => {
                // Session information: one session starting at track 1.
                self.reply.extend_from_slice(&[0, 0, 1, 1, 0, 0x14, 1, 0]);
                self.reply.extend_from_slice(&addr(0));
            }
            _ => return Done::Check(INVALID_FIELD, 0),
        }
        let len = (self.reply.len() - 2) as u16;
        self.reply[0..2].copy_from_slice(&len.to_be_bytes());
        self.send_reply(mem, skip, room, alloc)
    }

    fn get_configuration(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        let start = be16(&cdb[2..4]);
        let alloc = be16(&cdb[7..9]);
        self.reply.clear();
        // Header: data length, reserved, current profile CD-ROM (0x0008).
        self.reply
            .extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x00, 0x08]);
        if start == 0 {
            // Feature 0, the profile list: just CD-ROM, current.
            self.reply
                .extend_from_slice(&[0x00, 0x00, 0x03, 0x04, 0x00, 0x08, 0x01, 0x00]);
        }
        let len = (self.reply.len() - 4) as u32;
        self.reply[0..4].copy_from_slice(&len.to_be_bytes());
        self.send_reply(mem, skip, room, alloc)
    }

    fn event_status(
        &mut self,
        mem: &GuestMemoryMmap,
        cdb: &[u8; CDB_MAX],
        skip: u64,
        room: u64,
    ) -> Done {
        if cdb[1] & 0x01 == 0 {
            // Only polled operation.
            return Done::Check(INVALID_FIELD, 0);
        }
        let alloc = be16(&cdb[7..9]);
        self.reply.clear();
        const MEDIA_CLASS: u8 = 1 << 4;
        if cdb[4] & MEDIA_CLASS != 0 {
            // Media class: no change, medium present.
            self.reply
                .extend_from_slice(&[0, 6, 0x04, MEDIA_CLASS, 0, 0x02, 0, 0]);
        } else {
            // No event available.
            self.reply.extend_from_slice(&[0, 2, 0x80, MEDIA_CLASS]);
        }
        self.send_reply(mem, skip, room, alloc)
    }

    /// Answers a control-queue request; returns the bytes written.
    fn control(&mut self, mem: &GuestMemoryMmap) -> u64 {
        let mut ty = [0u8; 4];
        let ty = match self.bufs.read(mem, 0, &mut ty) {
            Ok(()) => u32::from_le_bytes(ty),
            Err(_) => u32::MAX,
        };
        let writable = self.bufs.writable_len;
        // TMF: u8 response; AN: le32 event_actual, u8 response.
        let (reply, len): ([u8; 5], usize) = match ty {
            VIRTIO_SCSI_T_TMF => ([VIRTIO_SCSI_S_OK, 0, 0, 0, 0], 1),
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                ([0, 0, 0, 0, VIRTIO_SCSI_S_OK], 5)
            }
            _ => ([VIRTIO_SCSI_S_FAILURE, 0, 0, 0, 0], 1),
        };
        let n = (len as u64).min(writable) as usize;
        match self.bufs.write(mem, 0, &reply[..n]) {
            Ok(()) => n as u64,
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        TYPE_SCSI
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only sense_size and cdb_size are the driver's to write.
        let at = match (offset, data.len()) {
            (o, 4) if o == CONFIG_SENSE_SIZE as u64 || o == CONFIG_CDB_SIZE as u64 => o as usize,
            _ => {
                log::debug!("virtio-scsi: ignored config write at {offset}");
                return;
            }
        };
        self.config[at..at + 4].copy_from_slice(data);
    }

    fn reset(&mut self) {
        self.reset_config();
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, VirtioError> {
        if index != CONTROL_QUEUE && index != REQUEST_QUEUE {
            // Event buffers wait for events that never come.
            return Ok(0);
        }
        let mut used = 0;
        while let Some(chain) = next_chain(queue, mem)? {
            self.bufs.load(chain)?;
            let head = self.bufs.head;
            let written = if index == CONTROL_QUEUE {
                self.control(mem)
            } else {
                self.request(mem)
                    .map_err(|()| VirtioError::NoStatus(head))?
            };
            queue.add_used(mem, head, written.min(u64::from(u32::MAX)) as u32)?;
            used += 1;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msf_addresses() {
        assert_eq!(msf(0), [0, 0, 2, 0]);
        assert_eq!(msf(75 * 60 - 150), [0, 1, 0, 0]);
        assert_eq!(msf(1), [0, 0, 2, 1]);
    }

    #[test]
    fn config_defaults_and_driver_writes() {
        let f = File::open("/dev/null").unwrap();
        let mut d = VirtioScsi::new(f, 4 * BLOCK);
        let mut b = [0u8; 4];
        d.read_config(CONFIG_CDB_SIZE as u64, &mut b);
        assert_eq!(u32::from_le_bytes(b), DEFAULT_CDB_SIZE);
        d.write_config(CONFIG_SENSE_SIZE as u64, &64u32.to_le_bytes());
        d.write_config(0, &7u32.to_le_bytes()); // num_queues: read-only
        d.read_config(CONFIG_SENSE_SIZE as u64, &mut b);
        assert_eq!(u32::from_le_bytes(b), 64);
        d.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        d.reset();
        d.read_config(CONFIG_SENSE_SIZE as u64, &mut b);
        assert_eq!(u32::from_le_bytes(b), DEFAULT_SENSE_SIZE);
    }
}

//! virtio-rng (virtio 1.2, 5.4): one queue; every writable buffer the
//! driver offers is filled from getrandom(2).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::{next_chain, ChainBuffers, VirtioDevice, VirtioError, TYPE_RNG};

const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request (a driver asking for more gets
/// this much, which the spec allows).
const MAX_PER_REQUEST: usize = 64 << 10;
const CHUNK: usize = 4096;

pub struct VirtioRng {
    bufs: ChainBuffers,
    scratch: Vec<u8>,
}

impl VirtioRng {
    pub fn new() -> VirtioRng {
        VirtioRng {
            bufs: ChainBuffers::default(),
            scratch: vec![0; CHUNK],
        }
    }
}

impl Default for VirtioRng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, VirtioError> {
        let mut used = 0;
        while let Some(chain) = next_chain(queue, mem)? {
            self.bufs.load(chain)?;
            let want = (self.bufs.writable_len as usize).min(MAX_PER_REQUEST);
            let mut done = 0;
            while done < want {
                let n = (want - done).min(CHUNK);
                let chunk = &mut self.scratch[..n];
                if let Err(e) = getrandom(chunk) {
                    log::warn!("virtio-rng: getrandom: {e}");
                    break;
                }
                if self.bufs.write(mem, done as u64, chunk).is_err() {
                    break;
                }
                done += n;
            }
            queue.add_used(mem, self.bufs.head, done as u32)?;
            used += 1;
        }
        Ok(used)
    }
}

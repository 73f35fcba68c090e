//! The per-VM process. (Skeleton.)

use vmd_proto::Channel;

/// Role entry point: serves one VM over `chan`, returns the exit status.
pub fn run(chan: Channel) -> i32 {
    let _ = chan;
    todo!()
}

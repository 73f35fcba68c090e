//! The privileged helper. (Skeleton.)
use vmd_proto::Channel;

pub fn run(chan: Channel) -> i32 {
    let _ = chan;
    todo!()
}

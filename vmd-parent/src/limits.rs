//! Every limit that keeps one user from starving the others, in one place.
//! docs/SECURITY.md lists them in its "Limits" table, which
//! tests/tests/hostile_user.rs reads and attacks with.

/// Instances (`vmctl start -t`) one user other than root may have.
pub const MAX_INSTANCES_PER_USER: usize = 16;

//! Thin wrappers over the Linux NUMA memory-policy syscall (`mbind`), which
//! libc exposes only as a raw syscall number.

use std::io;

const MPOL_BIND: libc::c_int = 2;

/// Binds the pages of `[addr, addr+len)` to host NUMA node `node`.
///
/// For a `MAP_SHARED` mapping of a memfd (shmem) the kernel stores the policy
/// on the shared object itself, so every later mapping of the same pages
/// (a guest's RAM) allocates on that node too.
pub fn bind_to_node(addr: usize, len: usize, node: u32) -> io::Result<()> {
    let bits = u64::BITS as usize;
    let mut mask = vec![0u64; node as usize / bits + 1];
    mask[node as usize / bits] |= 1u64 << (node as usize % bits);
    // maxnode counts bits; the kernel reads maxnode-1 of them.
    let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
    // SAFETY: mbind only changes the policy of the range (it dereferences
    // nothing in it); the mask outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len as libc::c_ulong,
            MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

//! Descriptor chain walking (split rings, direct and indirect tables) over
//! guest memory built from the input, and the host iovecs a backend makes
//! of the chain's buffers.

use backends::desc::{walk_chain, Descriptor, MAX_CHAIN_LEN};
use backends::memory::host_iovecs;
use vm_memory::GuestAddress;

use crate::input::Input;
use crate::mem::guest_memory;

/// Queue size (u16), head (u16), descriptor table address (u32), then the
/// guest memory image (see [`crate::mem`]).
pub fn desc_chain(data: &[u8]) {
    let mut inp = Input::new(data);
    let size = inp.u16();
    let head = inp.u16();
    let table = GuestAddress(u64::from(inp.u32()));
    let mem = guest_memory(inp.rest());
    let mut chain: Vec<Descriptor> = Vec::new();

    let walked = walk_chain(mem.as_ref(), table, size, head, &mut chain);

    assert!(chain.len() <= MAX_CHAIN_LEN);
    if walked.is_ok() {
        assert!(!chain.is_empty(), "a walked chain has a descriptor");
        let mut iov = Vec::new();
        if host_iovecs(&mem, &chain, &mut iov) {
            let covered: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
            let wanted: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
            assert_eq!(covered, wanted, "iovecs cover the buffers exactly");
        }
    }
}

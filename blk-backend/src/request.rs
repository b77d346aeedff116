//! Parsing a virtio-blk descriptor chain into a request, apart from executing it.
//!
//! Layout: a device-readable 16-byte header (`type: u32, reserved: u32,
//! sector: u64`), data descriptors, and a device-writable status byte as the
//! last byte of the last descriptor.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use backends::desc::Descriptor;

/// VIRTIO_BLK_T_* values.
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// VIRTIO_BLK_S_* values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Length of the device id answered to GET_ID.
pub const ID_LEN: usize = 20;

/// Request kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk.
    In,
    /// Write to the disk.
    Out,
    /// Flush.
    Flush,
    /// Device id.
    GetId,
    /// Discard.
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl RequestType {
    fn from_u32(v: u32) -> Self {
        match v {
            types::IN => RequestType::In,
            types::OUT => RequestType::Out,
            types::FLUSH => RequestType::Flush,
            types::GET_ID => RequestType::GetId,
            types::DISCARD => RequestType::Discard,
            types::WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    fn data_writable(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Kind.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Data buffers, all in the direction the kind needs.
    pub data: Vec<Descriptor>,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// No device-writable byte at the end for the status.
    #[error("No status descriptor")]
    NoStatus,
    /// The header is missing, too short, writable or unreadable.
    #[error("Invalid request header")]
    Header,
    /// A data buffer has the wrong direction.
    #[error("Data descriptor has the wrong direction")]
    Direction,
    /// Data length is not a whole number of sectors.
    #[error("Data length {0} is not a multiple of 512")]
    Length(u64),
}

/// A parse failure, with the status address when one was found.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseFailure {
    /// What is wrong.
    pub error: RequestError,
    /// Where to write IOERR, if known.
    pub status: Option<GuestAddress>,
}

/// Parses the descriptors of one chain.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &[Descriptor],
) -> Result<Request, ParseFailure> {
    parse_into(mem, chain, Vec::new())
}

/// Like [`parse`], building [`Request::data`] in `data` (cleared first), so a
/// caller can hand the same allocation back request after request.
pub fn parse_into<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &[Descriptor],
    mut data: Vec<Descriptor>,
) -> Result<Request, ParseFailure> {
    data.clear();
    let fail = |error, status| ParseFailure { error, status };
    let (last, rest) = chain
        .split_last()
        .ok_or(fail(RequestError::NoStatus, None))?;
    if !last.writable || last.len == 0 {
        return Err(fail(RequestError::NoStatus, None));
    }
    let status = last
        .addr
        .0
        .checked_add(u64::from(last.len) - 1)
        .map(GuestAddress);
    let status = status.ok_or(fail(RequestError::NoStatus, None))?;
    let (head, middle) = rest
        .split_first()
        .ok_or(fail(RequestError::Header, Some(status)))?;
    if head.writable || head.len < 16 {
        return Err(fail(RequestError::Header, Some(status)));
    }
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, head.addr)
        .map_err(|_| fail(RequestError::Header, Some(status)))?;
    let kind = RequestType::from_u32(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());

    if head.len > 16 {
        data.push(Descriptor {
            addr: GuestAddress(head.addr.0.wrapping_add(16)),
            len: head.len - 16,
            writable: false,
        });
    }
    data.extend_from_slice(middle);
    if last.len > 1 {
        data.push(Descriptor {
            addr: last.addr,
            len: last.len - 1,
            writable: true,
        });
    }
    if let RequestType::Unsupported(_) = kind {
        data.clear();
        return Ok(Request {
            kind,
            sector,
            data,
            data_len: 0,
            status,
        });
    }
    if kind != RequestType::Flush && data.iter().any(|d| d.writable != kind.data_writable()) {
        return Err(fail(RequestError::Direction, Some(status)));
    }
    let data_len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if matches!(kind, RequestType::In | RequestType::Out) && data_len % SECTOR != 0 {
        return Err(fail(RequestError::Length(data_len), Some(status)));
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem_with_header(kind: u32, sector: u64) -> GuestMemoryMmap<()> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x100)).unwrap();
        mem
    }

    fn d(addr: u64, len: u32, writable: bool) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    #[test]
    fn read_request_is_parsed() {
        let mem = mem_with_header(types::IN, 7);

        let req = parse(
            &mem,
            &[
                d(0x100, 16, false),
                d(0x1000, 4096, true),
                d(0x200, 1, true),
            ],
        )
        .unwrap();

        assert_eq!(
            (req.kind, req.sector, req.data_len, req.status),
            (RequestType::In, 7, 4096, GuestAddress(0x200))
        );
    }

    #[test]
    fn status_shares_last_data_descriptor() {
        let mem = mem_with_header(types::IN, 0);

        let req = parse(&mem, &[d(0x100, 16, false), d(0x1000, 513, true)]).unwrap();

        assert_eq!((req.data_len, req.status), (512, GuestAddress(0x1200)));
    }

    #[test]
    fn read_into_readonly_buffer_is_rejected() {
        let mem = mem_with_header(types::IN, 0);

        let err = parse(
            &mem,
            &[
                d(0x100, 16, false),
                d(0x1000, 512, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap_err();

        assert_eq!(
            err,
            ParseFailure {
                error: RequestError::Direction,
                status: Some(GuestAddress(0x200))
            }
        );
    }

    #[test]
    fn chain_without_writable_status_is_rejected() {
        let mem = mem_with_header(types::OUT, 0);

        let err = parse(&mem, &[d(0x100, 16, false), d(0x1000, 512, false)]).unwrap_err();

        assert_eq!(err.error, RequestError::NoStatus);
    }

    #[test]
    fn short_header_is_rejected() {
        let mem = mem_with_header(types::OUT, 0);

        let err = parse(&mem, &[d(0x100, 8, false), d(0x200, 1, true)]).unwrap_err();

        assert_eq!(err.error, RequestError::Header);
    }

    #[test]
    fn partial_sector_write_is_rejected() {
        let mem = mem_with_header(types::OUT, 0);

        let err = parse(
            &mem,
            &[
                d(0x100, 16, false),
                d(0x1000, 100, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap_err();

        assert_eq!(err.error, RequestError::Length(100));
    }

    #[test]
    fn unknown_type_parses_as_unsupported() {
        let mem = mem_with_header(99, 0);

        let req = parse(&mem, &[d(0x100, 16, false), d(0x200, 1, true)]).unwrap();

        assert_eq!(req.kind, RequestType::Unsupported(99));
    }
}

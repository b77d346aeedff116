//! virtio-net feature bits, the virtio-net header, and the translation
//! between virtio offload features and tap (`TUN_F_*`) offloads.

use thiserror::Error;

/// virtio-net and transport feature bits.
pub mod features {
    /// VIRTIO_NET_F_CSUM: the device handles partial checksums on TX.
    pub const CSUM: u64 = 1 << 0;
    /// VIRTIO_NET_F_GUEST_CSUM: the driver handles partial checksums on RX.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// VIRTIO_NET_F_MTU.
    pub const MTU: u64 = 1 << 3;
    /// VIRTIO_NET_F_MAC.
    pub const MAC: u64 = 1 << 5;
    /// VIRTIO_NET_F_GUEST_TSO4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// VIRTIO_NET_F_GUEST_TSO6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// VIRTIO_NET_F_GUEST_ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// VIRTIO_NET_F_GUEST_UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// VIRTIO_NET_F_HOST_TSO4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// VIRTIO_NET_F_HOST_TSO6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// VIRTIO_NET_F_HOST_ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// VIRTIO_NET_F_HOST_UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// VIRTIO_NET_F_MRG_RXBUF.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// VIRTIO_NET_F_STATUS.
    pub const STATUS: u64 = 1 << 16;
    /// VIRTIO_NET_F_CTRL_VQ.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// VIRTIO_NET_F_MQ.
    pub const MQ: u64 = 1 << 22;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// VIRTIO_NET_HDR_F_NEEDS_CSUM.
pub const F_NEEDS_CSUM: u8 = 1;
/// VIRTIO_NET_HDR_F_DATA_VALID.
pub const F_DATA_VALID: u8 = 2;
/// VIRTIO_NET_HDR_GSO_NONE.
pub const GSO_NONE: u8 = 0;
/// VIRTIO_NET_HDR_GSO_TCPV4.
pub const GSO_TCPV4: u8 = 1;
/// VIRTIO_NET_HDR_GSO_UDP.
pub const GSO_UDP: u8 = 3;
/// VIRTIO_NET_HDR_GSO_TCPV6.
pub const GSO_TCPV6: u8 = 4;
/// VIRTIO_NET_HDR_GSO_ECN.
pub const GSO_ECN: u8 = 0x80;
/// Ethernet header plus one VLAN tag.
pub const ETH_OVERHEAD: usize = 18;
/// Largest segmentation-offload frame: a 64 KiB IP packet plus Ethernet.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_OVERHEAD;

/// Why a guest frame's header is refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum HdrError {
    /// The chain is shorter than the header plus an Ethernet header.
    #[error("Frame too short")]
    Short,
    /// Unknown GSO type, or one whose feature was not offered.
    #[error("Unsupported GSO type {0:#x}")]
    Gso(u8),
    /// GSO with a zero segment size.
    #[error("GSO without segment size")]
    GsoSize,
    /// Checksum offsets point past the frame.
    #[error("Checksum offsets past the frame")]
    Csum,
    /// The frame is longer than the MTU (or 64 KiB with GSO).
    #[error("Frame of {0} bytes over the limit")]
    Oversize(usize),
}

/// `struct virtio_net_hdr_v1`, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_*` flags.
    pub flags: u8,
    /// `GSO_*` type.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this frame spans (mergeable RX buffers).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Parses the first [`HDR_LEN`] bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }

    /// Serialises into [`HDR_LEN`] bytes.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Checks a guest TX header against the frame length that follows it,
    /// the MTU and the offered features.
    pub fn check_tx(&self, frame_len: usize, mtu: u16, offered: u64) -> Result<(), HdrError> {
        if frame_len < 14 {
            return Err(HdrError::Short);
        }
        let gso = self.gso_type & !GSO_ECN;
        let needed = match gso {
            GSO_NONE => 0,
            GSO_TCPV4 => features::HOST_TSO4,
            GSO_TCPV6 => features::HOST_TSO6,
            GSO_UDP => features::HOST_UFO,
            _ => return Err(HdrError::Gso(self.gso_type)),
        };
        if offered & needed != needed
            || (self.gso_type & GSO_ECN != 0 && offered & features::HOST_ECN == 0)
        {
            return Err(HdrError::Gso(self.gso_type));
        }
        if gso != GSO_NONE && self.gso_size == 0 {
            return Err(HdrError::GsoSize);
        }
        if self.flags & F_NEEDS_CSUM != 0
            && usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 > frame_len
        {
            return Err(HdrError::Csum);
        }
        let limit = match gso {
            GSO_NONE => usize::from(mtu) + ETH_OVERHEAD,
            _ => MAX_GSO_FRAME,
        };
        if frame_len > limit {
            return Err(HdrError::Oversize(frame_len));
        }
        Ok(())
    }
}

/// Length of the virtio-net header for the acked `features`: 12 bytes with
/// VERSION_1 or MRG_RXBUF, else the legacy 10.
pub fn hdr_len(features: u64) -> usize {
    if features & (features::VERSION_1 | features::MRG_RXBUF) != 0 {
        HDR_LEN
    } else {
        HDR_LEN - 2
    }
}

/// The tap offloads (`TUN_F_*`) that let the tap hand the driver what its
/// `GUEST_*` features say it can take.
pub fn tun_offload_for(guest_features: u64) -> libc::c_uint {
    use features::*;
    if guest_features & GUEST_CSUM == 0 {
        return 0;
    }
    let map = [
        (GUEST_TSO4, libc::TUN_F_TSO4),
        (GUEST_TSO6, libc::TUN_F_TSO6),
        (GUEST_ECN, libc::TUN_F_TSO_ECN),
        (GUEST_UFO, libc::TUN_F_UFO),
    ];
    map.iter()
        .filter(|(f, _)| guest_features & f != 0)
        .fold(libc::TUN_F_CSUM, |acc, (_, t)| acc | t)
}

/// The offload features to offer given the `TUN_F_*` flags the tap accepted:
/// `GUEST_*` follow the tap; `HOST_*` need only the tap's vnet header, which
/// accepts partial checksums and GSO frames from us.
pub fn offload_features(tun: libc::c_uint) -> u64 {
    use features::*;
    let mut f = CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO;
    if tun & libc::TUN_F_CSUM == 0 {
        return f;
    }
    f |= GUEST_CSUM;
    let map = [
        (libc::TUN_F_TSO4, GUEST_TSO4),
        (libc::TUN_F_TSO6, GUEST_TSO6),
        (libc::TUN_F_TSO_ECN, GUEST_ECN),
        (libc::TUN_F_UFO, GUEST_UFO),
    ];
    map.iter()
        .filter(|(t, _)| tun & t != 0)
        .fold(f, |acc, (_, g)| acc | g)
}

#[cfg(test)]
mod tests {
    use super::features::*;
    use super::*;

    const ALL: u64 = CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO;

    #[test]
    fn header_round_trips_little_endian() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };

        let b = h.to_bytes();

        assert_eq!(&b[4..6], &1448u16.to_le_bytes());
        assert_eq!(VnetHdr::parse(&b), h);
    }

    #[test]
    fn plain_frame_over_mtu_is_oversize() {
        let h = VnetHdr::default();

        assert_eq!(h.check_tx(1519, 1500, ALL), Err(HdrError::Oversize(1519)));
        assert_eq!(h.check_tx(1518, 1500, ALL), Ok(()));
    }

    #[test]
    fn tso_frame_may_exceed_mtu_up_to_64k() {
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };

        assert_eq!(h.check_tx(65000, 1500, ALL), Ok(()));
        assert_eq!(
            h.check_tx(MAX_GSO_FRAME + 1, 1500, ALL),
            Err(HdrError::Oversize(MAX_GSO_FRAME + 1))
        );
    }

    #[test]
    fn gso_without_offered_feature_is_refused() {
        let h = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 1400,
            ..Default::default()
        };

        assert_eq!(
            h.check_tx(3000, 1500, CSUM | HOST_TSO4),
            Err(HdrError::Gso(GSO_TCPV6))
        );
    }

    #[test]
    fn unknown_gso_type_and_bad_csum_offsets_are_refused() {
        let gso = VnetHdr {
            gso_type: 9,
            ..Default::default()
        };
        let csum = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 90,
            csum_offset: 16,
            ..Default::default()
        };

        assert_eq!(gso.check_tx(100, 1500, ALL), Err(HdrError::Gso(9)));
        assert_eq!(csum.check_tx(100, 1500, ALL), Err(HdrError::Csum));
        assert_eq!(
            VnetHdr::default().check_tx(13, 1500, ALL),
            Err(HdrError::Short)
        );
    }

    #[test]
    fn guest_offloads_translate_to_tun_flags() {
        let tun = tun_offload_for(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_UFO);

        assert_eq!(
            tun,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert_eq!(tun_offload_for(GUEST_TSO4), 0);
    }

    #[test]
    fn header_length_follows_version_1_and_mergeable_buffers() {
        assert_eq!(hdr_len(VERSION_1), 12);
        assert_eq!(hdr_len(MRG_RXBUF), 12);
        assert_eq!(hdr_len(CSUM), 10);
    }

    #[test]
    fn accepted_tun_flags_translate_back_to_features() {
        let f = offload_features(libc::TUN_F_CSUM | libc::TUN_F_TSO4);

        assert_eq!(
            f & (GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6),
            GUEST_CSUM | GUEST_TSO4
        );
        assert_eq!(offload_features(0) & GUEST_CSUM, 0);
    }
}

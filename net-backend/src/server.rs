//! Serving frontends: `backends`' server and handler, which pass the acked
//! features to [`NetDevice`] and enable queue pair 0 for QEMU
//! (see [`backends::Device`]).

use crate::device::NetDevice;

/// The net device served over vhost-user, one frontend at a time.
pub type NetServer = backends::server::Server<NetDevice>;

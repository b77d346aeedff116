//! [`NetHandler`]: `backends`' vhost-user handler with the acked features
//! passed on to the net device (`SET_FEATURES`) before the queues start.
//! Every other request goes straight to the shared handler.

use std::fs::File;
use std::sync::Arc;

use backends::handler::Handler;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use crate::device::NetDevice;

/// The shared handler plus the net device it serves.
pub struct NetHandler {
    inner: Handler<NetDevice>,
    device: Arc<NetDevice>,
    /// Whether the frontend has enabled or disabled a ring itself since
    /// SET_FEATURES.
    explicit_enable: bool,
}

impl NetHandler {
    /// Wraps `inner`, which serves `device`.
    pub fn new(inner: Handler<NetDevice>, device: Arc<NetDevice>) -> Self {
        NetHandler {
            inner,
            device,
            explicit_enable: false,
        }
    }

    /// The shared handler.
    pub fn inner(&mut self) -> &mut Handler<NetDevice> {
        &mut self.inner
    }
}

impl VhostUserBackendReqHandlerMut for NetHandler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        self.inner.set_owner()
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.inner.reset_owner()
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.inner.reset_device()
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        self.inner.get_features()
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let offered = self.inner.get_features()?;
        if features & !offered != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        let virtio = features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.device
            .set_acked_features(virtio)
            .map_err(|e| VhostUserError::ReqHandlerError(std::io::Error::other(e)))?;
        self.inner.set_features(features)?;
        // QEMU enables queue pair 0 with SET_VRING_ENABLE *before*
        // SET_FEATURES and, with a single queue pair, never again; the
        // vhost crate refuses those early requests (PROTOCOL_FEATURES not yet
        // acked), so the pair would stay disabled. Enable it here, as QEMU
        // meant; a frontend that sends its own SET_VRING_ENABLE later (our
        // VMM does, after the rings are set up) still decides.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
            && !self.explicit_enable
        {
            self.inner.set_vring_enable(0, true)?;
            self.inner.set_vring_enable(1, true)?;
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.inner.set_mem_table(ctx, files, postcopy)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        self.inner.set_vring_num(index, num)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostUserResult<()> {
        self.inner
            .set_vring_addr(index, flags, descriptor, used, available, log)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        self.inner.set_vring_base(index, base)
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        self.inner.get_vring_base(index)
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.inner.set_vring_kick(index, fd)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.inner.set_vring_call(index, fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.inner.set_vring_err(index, fd)
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        self.inner.get_protocol_features()
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.inner.set_protocol_features(features)
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        self.inner.get_queue_num()
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        self.explicit_enable = true;
        self.inner.set_vring_enable(index, enable)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        self.inner.get_config(offset, size, flags)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.inner.set_config(offset, buf, flags)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.inner.set_backend_req_fd(backend)
    }

    fn set_gpu_socket(&mut self, gpu_backend: GpuBackend) -> VhostUserResult<()> {
        self.inner.set_gpu_socket(gpu_backend)
    }

    fn get_shared_object(&mut self, uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        self.inner.get_shared_object(uuid)
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        self.inner.get_inflight_fd(inflight)
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        self.inner.set_inflight_fd(inflight, file)
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        self.inner.get_max_mem_slots()
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        self.inner.add_mem_region(region, fd, postcopy)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        self.inner.remove_mem_region(region)
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostUserResult<Option<File>> {
        self.inner.set_device_state_fd(direction, phase, fd)
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        self.inner.check_device_state()
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        self.inner.get_shmem_config()
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        self.inner.set_log_base(log, file)
    }
}
